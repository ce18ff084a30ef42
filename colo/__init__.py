"""colo: colocated LoRA post-training (RL and SFT) with an in-process sampler.

``Trainer`` is imported on first use: the engines import ``colo.types`` and ``colo.errors``, and an
eager Trainer import here would import the engines back (a third-party engine's tests import
``engines.base`` first).
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
