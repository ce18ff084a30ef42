"""One GRPO step on the Trainer's four verbs: sample groups, score them, train on group-relative
advantages with the sampler's own logprobs, publish the next version.

The loss is ``importance_sampling`` on the logprobs the sampler reported, so a sampler whose
weights lag the trainer's (or differ in precision) is corrected for, not ignored. Advantages are
rewards centred within each group, without scaling by the group's spread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from colo.trainer import Trainer
from colo.types import AdamParams, Datum, SamplingParams


def group_advantages(rewards: Sequence[float]) -> list[float]:
    mean = sum(rewards) / len(rewards)
    return [r - mean for r in rewards]


def rl_datum(prompt: list[int], tokens: list[int], sampler_logprobs: list[float], advantage: float) -> Datum:
    """Score the completion only: the prompt positions get zero advantage."""
    sequence = prompt + tokens
    n_prompt = len(prompt) - 1  # positions whose target is still a prompt token
    return Datum(
        model_input=sequence[:-1],
        loss_fn_inputs={
            "target_tokens": torch.tensor(sequence[1:]),
            "logprobs": torch.tensor([0.0] * n_prompt + list(sampler_logprobs)),
            "advantages": torch.tensor([0.0] * n_prompt + [advantage] * len(tokens)),
        },
    )


@dataclass
class GRPOStep:
    rewards: list[float]  # every sample's, prompt after prompt
    version: int  # the version this step published
    sampled_version: int | None  # the version that produced the samples
    trained_sequences: int
    sampled_tokens: int
    trained_tokens: int  # positions through forward_backward, prompts included
    computed_tokens: int  # what forward_backward computed for them, each shared prompt once per micro-batch
    logprob_gap: float | None  # mean |trainer - sampler| logprob of the sampled tokens, same version
    sample_seconds: float
    train_seconds: float  # forward_backward + optimizer step, publishing excluded
    publish_seconds: float

    @property
    def mean_reward(self) -> float:
        return sum(self.rewards) / len(self.rewards)


def grpo_step(trainer: Trainer, adapter: str, prompts: Sequence[list[int]], score: Callable[[int, list[int]], float],
              group_size: int, sampling: SamplingParams, adam: AdamParams, skip_constant_groups: bool = True) -> GRPOStep:
    """``score(i, tokens)`` is the reward of a completion of ``prompts[i]``.

    ``skip_constant_groups``: a group whose samples all scored the same has zero advantage everywhere
    and adds no gradient; skipping it saves its forward and backward. Off, every sequence is trained
    (the work other trainers do, for comparisons).
    """
    started = time.perf_counter()
    results = trainer.sample(adapter, prompts, group_size, sampling)
    sample_seconds = time.perf_counter() - started

    data, rewards, sampled = [], [], []
    for i, (prompt, result) in enumerate(zip(prompts, results)):
        group = [score(i, s.tokens) for s in result.sequences]
        rewards += group
        if skip_constant_groups and len(set(group)) == 1:
            continue
        for seq, advantage in zip(result.sequences, group_advantages(group)):
            data.append(rl_datum(prompt, seq.tokens, seq.logprobs, advantage))
            sampled.append(seq.logprobs)

    started = time.perf_counter()
    gap = None
    computed = 0
    if data:
        out = trainer.forward_backward(adapter, data, "importance_sampling")
        computed = int(out.metrics["tokens_computed:sum"])
        # the trainer's logprobs of the sampled tokens, under the version that sampled them
        diffs = [abs(t - s) for o, lp in zip(out.loss_fn_outputs, sampled) if lp
                 for t, s in zip(o["logprobs"][-len(lp):].tolist(), lp)]
        gap = sum(diffs) / len(diffs) if diffs else None
    step = trainer.optim_step(adapter, adam)
    publish_seconds = step.metrics["publish_seconds:sum"]
    return GRPOStep(
        rewards=rewards, version=step.version, sampled_version=results[0].adapter_version,
        trained_sequences=len(data), sampled_tokens=sum(len(s.tokens) for r in results for s in r.sequences),
        trained_tokens=sum(len(d.model_input) for d in data), computed_tokens=computed, logprob_gap=gap, sample_seconds=sample_seconds,
        train_seconds=time.perf_counter() - started - publish_seconds, publish_seconds=publish_seconds)
