"""Per-datum losses, as Tinker defines them. Each returns a scalar that is summed over the batch.

``logprobs`` is the trainer's logprob of each target token, shape (N,); ``inputs`` is the datum's
``loss_fn_inputs``. Ratios use the sampler's logprobs (``inputs["logprobs"]``): that is what makes
the policy-gradient losses correct when the sampler's weights lag the trainer's.

``stable_reinforce``'s objective is colo's choice (Tinker documents its protocol, not its formula):
REINFORCE with truncated importance weights, w = min(p/q, truncation) held constant (TIS: Yao et al.
2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"), plus an optional
quadratic penalty kl_coeff * (log p - log q)^2 / 2 on the trained (nonzero-advantage) tokens.
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


def sampled(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The positions that were sampled: those whose sampler logprob and advantage are both 0 (a prompt, in the
    cookbook's datums, which carry no ``mask`` to the service) were not."""
    return (inputs["logprobs"] != 0) | (inputs["advantages"] != 0)


def sampler_gap(inputs: list[dict[str, torch.Tensor]], trainer: list[torch.Tensor]) -> dict[str, float]:
    """How far the sampler's logprobs (``inputs[i]["logprobs"]``) are from the trainer's, over the sampled
    positions, as tinker-cookbook measures it: ``kl_sample_train_v1`` = mean(sampler - trainer),
    ``kl_sample_train_v2`` = mean((sampler - trainer)^2) / 2, and the largest absolute difference. Near 0 when
    the sampler had the weights being trained; a stale or mismatched sampler shows here first."""
    diffs = [(x["logprobs"].float() - lp.float())[sampled(x)] for x, lp in zip(inputs, trainer)]
    d = torch.cat(diffs) if diffs else torch.zeros(0)
    if d.numel() == 0:
        return {}
    return {"kl_sample_train_v1:mean": float(d.mean()), "kl_sample_train_v2:mean": float(0.5 * (d ** 2).mean()),
            "sampler_gap_max:max": float(d.abs().max())}


def dro(logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict[str, float]) -> torch.Tensor:
    """Tinker's DRO: maximise log p * A - beta/2 * (log p - log q)^2 over the sampled tokens (``sampled``)."""
    sampler, advantages = inputs["logprobs"], inputs["advantages"]
    objective = logprobs * advantages - 0.5 * config["beta"] * (logprobs - sampler) ** 2
    return -(objective * sampled(inputs)).sum()


def gspo(logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict[str, float]) -> torch.Tensor:
    """GSPO (Zheng et al. 2025) in its token form: one ratio per sequence, the geometric mean of p/q over the
    positions of ``sequence_ratio_mask`` (default: the nonzero-advantage ones), carried to each token with the
    token's own gradient, and clipped as PPO clips (thresholds around 1: 1 - 3e-4 and 1 + 4e-4, the paper's)."""
    sampler, advantages = inputs["logprobs"], inputs["advantages"]
    mask = inputs.get("sequence_ratio_mask")
    in_ratio = (mask != 0) if mask is not None else (advantages != 0)
    log_ratio = (logprobs.detach() - sampler)[in_ratio].mean() if bool(in_ratio.any()) else logprobs.new_zeros(())
    ratio = torch.exp(log_ratio + logprobs - logprobs.detach())  # value: the sequence's; gradient: the token's
    clipped = torch.clamp(ratio, config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.min(ratio * advantages, clipped * advantages).sum()


def stable_reinforce(logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict[str, float]) -> torch.Tensor:
    sampler, advantages = inputs["logprobs"], inputs["advantages"]
    weight = torch.exp(logprobs.detach() - sampler).clamp(max=config["truncation"])
    trained = advantages != 0
    penalty = 0.5 * config["kl_coeff"] * ((logprobs - sampler) ** 2 * trained).sum()
    return -(weight * advantages * logprobs).sum() + penalty


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
    # beta: Tinker's documentation shows 0.05 and states no default; colo takes that value
    "dro": LossSpec(dro, required=("logprobs", "advantages"), defaults=(("beta", 0.05),)),
    "gspo": LossSpec(gspo, required=("logprobs", "advantages"), optional=("sequence_ratio_mask",),
                     defaults=(("clip_low_threshold", 1 - 3e-4), ("clip_high_threshold", 1 + 4e-4))),
    "stable_reinforce": LossSpec(stable_reinforce, required=("logprobs", "advantages"),
                                 defaults=(("truncation", 2.0), ("kl_coeff", 0.0))),
}
