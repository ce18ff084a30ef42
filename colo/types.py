"""Small typed data exchanged with the Trainer, shaped like the Tinker API's types."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

StopReason = Literal["stop", "length"]


@dataclass
class Datum:
    """One training sequence.

    ``model_input[i]`` is the token at position i; the model's prediction at position i is scored
    against ``loss_fn_inputs["target_tokens"][i]`` (usually ``model_input[i + 1]``). Every tensor in
    ``loss_fn_inputs`` has one entry per position of ``model_input``.
    """

    model_input: list[int]
    loss_fn_inputs: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        self.model_input = [int(t) for t in self.model_input]
        self.loss_fn_inputs = {k: torch.as_tensor(v) for k, v in self.loss_fn_inputs.items()}

    @classmethod
    def from_sequence(cls, tokens: Sequence[int], weights: Sequence[float] | None = None) -> Datum:
        """A next-token-prediction datum: inputs ``tokens[:-1]``, targets ``tokens[1:]``.

        ``weights`` (one per token of ``tokens``, default all ones) weighs the loss on each token;
        the weight of the first token is dropped since nothing predicts it.
        """
        tokens = list(tokens)
        w = torch.ones(len(tokens) - 1) if weights is None else torch.as_tensor(weights, dtype=torch.float32)[1:]
        return cls(
            model_input=tokens[:-1],
            loss_fn_inputs={"target_tokens": torch.tensor(tokens[1:]), "weights": w},
        )


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float | None = None  # None: equal to rank (scale 1)
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = False


@dataclass(frozen=True)
class AdamParams:
    """AdamW hyperparameters of one optimizer step (Tinker's defaults)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0: no clipping


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: all tokens
    stop: tuple[str | int, ...] = ()  # stop strings and/or stop token ids
    seed: int | None = None

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, (str, int)):
            stop = (stop,)
        object.__setattr__(self, "stop", tuple(stop or ()))

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return tuple(s for s in self.stop if isinstance(s, int))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(s for s in self.stop if isinstance(s, str))


@dataclass(frozen=True)
class SampleJob:
    """One prompt to sample, for ``Trainer.sample_batch``: jobs of different adapters share one engine call."""

    adapter: str | None  # None: the base model
    prompt: Sequence[int]
    num_samples: int = 1
    params: SamplingParams = SamplingParams()
    prompt_logprobs: bool = False  # also score the prompt's own tokens


@dataclass
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]  # raw (temperature 1) logprob of each sampled token
    stop_reason: StopReason


@dataclass
class SampleResult:
    """The samples of one prompt, and which adapter version produced them."""

    sequences: list[SampledSequence]
    adapter: str | None
    adapter_version: int | None
    prompt_logprobs: list[float | None] | None = None  # when asked: one per prompt token, the first None


@dataclass
class ForwardBackwardOutput:
    loss_fn_outputs: list[dict[str, torch.Tensor]]  # per datum: {"logprobs": tensor}
    metrics: dict[str, float] = field(default_factory=dict)  # keys are "name:reduction"


@dataclass(frozen=True)
class OptimStepOutput:
    adapter: str
    version: int
    metrics: dict[str, float] = field(default_factory=dict)
