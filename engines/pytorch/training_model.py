"""What the pytorch engine uses of the Trainer's model: the one engine handed that model at all.

``colo.model.PolicyModel`` has this shape; the engine depends on the protocol, not on that class, so
``engines/`` never imports the Trainer's side.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

import torch


class TrainingModel(Protocol):
    pad_token_id: int
    eos_token_ids: frozenset[int]
    vocab_size: int  # rows of the input embedding: ids the sampler may draw are below it

    def without_adapters(self) -> AbstractContextManager[torch.nn.Module]:
        """The Hugging Face causal LM with PEFT's own LoRA switched off for the block. Its LoRA layers
        (``peft.tuners.lora.LoraLayer``) still hold every adapter's live weights: the engine reads them to
        apply each row's adapter itself (``engines.pytorch.mixed_lora``)."""
