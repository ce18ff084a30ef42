"""colo: colocated LoRA post-training (RL and SFT) with an in-process sampler.

``Trainer`` is imported on first use. Every ``colo.x`` import runs this file first, and the engines
import the small core (``colo.types``, ``colo.errors``, ...): an eager Trainer import here would load the
Trainer, its model and the engine registry into any program that imports one engine.
"""

from colo.config import Config
from colo.errors import (CheckpointError, ColoError, ConfigError, ContextLengthError, EngineError,
                         InvalidRequestError, UnknownAdapterError)
from colo.types import (AdamParams, Datum, ForwardBackwardOutput, LoraConfig, OptimStepOutput, SampledSequence,
                        SampleJob, SampleResult, SamplingParams)

__all__ = [
    "AdamParams", "CheckpointError", "ColoError", "Config", "ConfigError", "ContextLengthError", "Datum",
    "EngineError", "ForwardBackwardOutput", "InvalidRequestError", "LoraConfig", "OptimStepOutput",
    "SampleJob", "SampleResult", "SampledSequence", "SamplingParams", "Trainer", "UnknownAdapterError",
]


def __getattr__(name: str):
    if name == "Trainer":
        from colo.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'colo' has no attribute {name!r}")
