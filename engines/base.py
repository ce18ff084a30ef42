"""The interface every sampler implements, and what the Trainer hands it.

The contracts (shared/DESIGN.md): token ids in and out; each adapter version gets its own identity
in the engine; capabilities are declared here, never guessed by the caller; sleep/wake is the
Trainer's to call. An engine sees its own settings, the base model's path, dtype, device and
tokenizer, and adapter versions as plain tensors: never the Trainer or its model. The one engine that
samples from the training model itself (``shares_trainer_weights``) is handed that model through a
protocol of its own (``engines.pytorch.training_model``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from colo.types import SampledSequence, SamplingParams


@dataclass(frozen=True)
class Capabilities:
    in_memory_adapter_loading: bool  # takes a new version's tensors without touching the disk
    runtime_adapter_loading: bool  # takes new adapters while running
    sleep: bool  # can release its memory while training runs
    shares_trainer_weights: bool  # samples from the trainer's own model: constructed as cls(context, model)
    multi_adapter_batch: bool  # serves several adapters in one batch
    unembed_lora: bool = False  # applies LoRA on the output layer (lm_head), for train_unembed
    # returns the logprobs of prompt tokens itself; where it cannot, the Trainer scores them with its model
    prompt_logprobs: bool = False
    # ... also while an adapter with an output-layer LoRA is loaded (vLLM scores a batch's prompts with one
    # adapter row per request, not per token, so a loaded lm_head LoRA can leak into other rows)
    unembed_prompt_logprobs: bool = False
    per_rank: bool = False  # under torchrun with several ranks: one engine per rank, each sampling its share
    spans_ranks: bool = False  # under several ranks: one engine across all of them, every rank making each call


@dataclass(frozen=True)
class AdapterVersion:
    adapter: str
    version: int


@dataclass(frozen=True)
class AdapterUpdate:
    """A new adapter version: its weights in PEFT's format (keys ``base_model.model....lora_A.weight``).

    ``tensors`` are the trainer's live parameters, not copies: the next optim_step changes them in
    place, so an engine that keeps weights must copy them before ``publish`` returns.
    """

    key: AdapterVersion
    peft_config: dict  # PEFT's LoraConfig as a dict: r, lora_alpha, target_modules, ...
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class SampleRequest:
    prompt: list[int]
    num_samples: int
    params: SamplingParams
    adapter: AdapterVersion | None  # None: the base model
    prompt_logprobs: bool = False  # also return the logprob of each prompt token (the first has none)


@dataclass
class Samples:
    """An engine's answer to one request; the Trainer stamps the adapter version on it."""

    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None  # when asked: one per prompt token, the first None


@dataclass(frozen=True)
class EngineSettings:
    """The settings every engine may read. An engine with settings of its own subclasses this and names
    the subclass in ``InferenceEngine.settings_class``; each field takes the configuration's value of the
    same name (``COLO_<FIELD>``)."""

    max_loras: int = 4
    max_lora_rank: int = 32
    seed: int = 0

    @classmethod
    def of(cls, config) -> EngineSettings:
        """This class's share of ``config`` (a ``colo.Config``, or anything with these attributes)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class EngineContext:
    """What an engine is built from."""

    settings: EngineSettings  # an instance of the engine's settings_class
    model_path: str  # the base model's Hugging Face directory
    dtype: torch.dtype  # the trainer's dtype: the sampler's logprobs must agree with the trainer's
    device: torch.device
    tokenizer: Any  # the base model's tokenizer (transformers' PreTrainedTokenizerBase)
    max_model_len: int  # the configured length, cut to the model's positions
    world_size: int = 1  # torchrun's ranks
    torchrun: bool = False  # started by torchrun: an engine with its own distributed state joins torchrun's


class InferenceEngine(ABC):
    name: ClassVar[str]
    capabilities: Capabilities  # a class attribute (vllm's is worked out for the platform on first read)
    settings_class: ClassVar[type[EngineSettings]] = EngineSettings

    def __init__(self, context: EngineContext) -> None:
        self.context = context

    @abstractmethod
    def publish(self, update: AdapterUpdate) -> None:
        """Make ``update`` servable; when this returns, a sample of that adapter uses these weights."""

    @abstractmethod
    def release(self, adapter: str) -> None:
        """The adapter was deleted: forget every version of it (once in-flight requests are done)."""

    def check(self, request: SampleRequest) -> None:
        """Raise ``InvalidRequestError`` if this engine would refuse ``request``: called for each request
        before it joins a batch, so that one request's value can never fail the others."""

    @abstractmethod
    def sample(self, requests: list[SampleRequest]) -> list[Samples]:
        """One answer per request, in order, from the version each request names. Requests are already
        validated by the Trainer; prompt logprobs are asked for only where ``capabilities`` says the engine
        gives them."""

    def sleep(self, level: int) -> int | None:
        """Release memory while training runs (engines with ``capabilities.sleep``); the bytes released,
        as the engine's allocator counts them, or None if it cannot say."""

    def wake(self) -> None:
        """Undo ``sleep`` before sampling."""

    def shutdown(self) -> None:
        """Release everything the engine holds."""

    def describe(self) -> list[str]:
        """Lines for ``colo doctor``: which of the engine's fast paths are on here, and why not."""
        return []
