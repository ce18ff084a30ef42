"""The interface every sampler implements, and the data the Trainer hands it.

The contracts (shared/DESIGN.md): token ids in and out; each adapter version gets its own identity
in the engine and a sample reports the version that produced it; capabilities are declared here,
never guessed by the caller; sleep/wake is the Trainer's to call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar

import torch

from colo.types import SampleResult, SamplingParams

if TYPE_CHECKING:
    from colo.model import PolicyModel


@dataclass(frozen=True)
class Capabilities:
    in_memory_adapter_loading: bool  # takes a new version's tensors without touching the disk
    runtime_adapter_loading: bool  # takes new adapters while running
    sleep: bool  # can release its memory while training runs
    shares_trainer_weights: bool  # samples from the trainer's own weights (no second copy)
    multi_adapter_batch: bool  # serves several adapters in one batch
    unembed_lora: bool = False  # applies LoRA on the output layer (lm_head), for train_unembed


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
    peft_config: dict
    tensors: dict[str, torch.Tensor]


@dataclass(frozen=True)
class SampleRequest:
    prompt: list[int]
    num_samples: int
    params: SamplingParams
    adapter: AdapterVersion | None  # None: the base model
    prompt_logprobs: bool = False  # also return the logprob of each prompt token (the first has none)


@dataclass(frozen=True)
class EngineSettings:
    """The settings an engine may read: its own, not the whole configuration (API keys, paths of the service)."""

    engine_url: str | None = None
    engine_adapter_dir: str | None = None
    engine_timeout_seconds: float = 300.0
    max_loras: int = 4
    max_lora_rank: int = 32
    gpu_memory_utilization: float = 0.3
    cpu_kvcache_space_gib: int = 1
    tensor_parallel_size: int = 1
    seed: int = 0
    pytorch_compile: str = "auto"
    vllm_kv_cache_dtype: str = "auto"
    vllm_prefix_caching: bool = True
    vllm_max_num_seqs: int | None = None
    vllm_max_num_batched_tokens: int | None = None
    vllm_enforce_eager: bool = False
    vllm_quantization: str | None = None
    vllm_attention_backend: str | None = None
    vllm_engine_args: dict = field(default_factory=dict)

    @classmethod
    def of(cls, config) -> EngineSettings:
        """The engine's share of ``config`` (a ``colo.Config``, or anything with these attributes)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


@dataclass
class EngineContext:
    """What an engine is built from. ``policy`` is the trainer's model: the pytorch engine samples from it,
    the vllm engine takes its dtype and scores prompts with it when vLLM cannot."""

    settings: EngineSettings
    model_path: str
    policy: PolicyModel
    max_model_len: int  # the configured length, cut to the model's positions


class InferenceEngine(ABC):
    name: ClassVar[str]
    capabilities: Capabilities  # a class attribute; see declared_capabilities where it depends on the platform

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
    def sample(self, requests: list[SampleRequest]) -> list[SampleResult]:
        """One result per request, in order. Requests are already validated by the Trainer."""

    def sleep(self, level: int) -> int | None:
        """Release memory while training runs (engines with ``capabilities.sleep``); the bytes released,
        as the engine's allocator counts them, or None if it cannot say."""

    def wake(self) -> None:
        """Undo ``sleep`` before sampling."""

    def shutdown(self) -> None:
        """Release everything the engine holds."""
