"""Per-datum losses, as Tinker defines them. Each returns a scalar that is summed over the batch.

``logprobs`` is the trainer's logprob of each target token, shape (N,); ``inputs`` is the datum's
``loss_fn_inputs``. Ratios use the sampler's logprobs (``inputs["logprobs"]``): that is what makes
the policy-gradient losses correct when the sampler's weights lag the trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor], dict[str, float]], torch.Tensor]


def cross_entropy(logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict[str, float]) -> torch.Tensor:
    weights = inputs.get("weights")
    if weights is None:
        weights = torch.ones_like(logprobs)
    return -(weights * logprobs).sum()


def importance_sampling(logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict[str, float]) -> torch.Tensor:
    ratio = torch.exp(logprobs - inputs["logprobs"])
    return -(ratio * inputs["advantages"]).sum()


def ppo(logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict[str, float]) -> torch.Tensor:
    ratio = torch.exp(logprobs - inputs["logprobs"])
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    advantages = inputs["advantages"]
    return -torch.min(ratio * advantages, clipped * advantages).sum()


def cispo(logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict[str, float]) -> torch.Tensor:
    ratio = torch.exp(logprobs - inputs["logprobs"])
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"]).detach()
    return -(clipped * logprobs * inputs["advantages"]).sum()


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    required: tuple[str, ...]  # loss_fn_inputs keys besides target_tokens
    optional: tuple[str, ...] = ()
    defaults: tuple[tuple[str, float], ...] = ()  # loss_fn_config keys and their defaults


_CLIP = (("clip_low_threshold", 0.8), ("clip_high_threshold", 1.2))

LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, required=(), optional=("weights",)),
    "importance_sampling": LossSpec(importance_sampling, required=("logprobs", "advantages")),
    "ppo": LossSpec(ppo, required=("logprobs", "advantages"), defaults=_CLIP),
    "cispo": LossSpec(cispo, required=("logprobs", "advantages"), defaults=_CLIP),
}
