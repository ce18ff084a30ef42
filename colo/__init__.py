"""colo: colocated LoRA post-training (RL and SFT) with an in-process sampler."""

from colo.config import Config
from colo.errors import (CheckpointError, ColoError, ConfigError, ContextLengthError, EngineError,
                         InvalidRequestError, UnknownAdapterError)
from colo.trainer import Trainer
from colo.types import (AdamParams, Datum, ForwardBackwardOutput, LoraConfig, OptimStepOutput, SampledSequence,
                        SampleJob, SampleResult, SamplingParams)

__all__ = [
    "AdamParams", "CheckpointError", "ColoError", "Config", "ConfigError", "ContextLengthError", "Datum",
    "EngineError", "ForwardBackwardOutput", "InvalidRequestError", "LoraConfig", "OptimStepOutput",
    "SampleJob", "SampleResult", "SampledSequence", "SamplingParams", "Trainer", "UnknownAdapterError",
]
