"""A short GRPO run on the real default model (SmolLM2-135M-Instruct) through the colocated vLLM
engine: the reward must rise. Marked slow (about 3 minutes on 2 cores); `make test` runs it,
`make test-fast` leaves it out."""

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from grpo_arithmetic import Settings, split_questions, train_step  # noqa: E402


@pytest.mark.slow
def test_grpo_reward_rises_on_the_default_model():
    from colo import Trainer

    settings = Settings(steps=8, questions_per_step=6, group_size=8)
    rng = random.Random(settings.seed)
    train, _ = split_questions(settings.max_operand, settings.held_out, rng)
    with Trainer(engine="vllm") as trainer:
        adapter = trainer.create_lora(rank=settings.rank, seed=settings.seed)
        rows = [train_step(trainer, adapter, rng.sample(train, settings.questions_per_step), settings, step)
                for step in range(1, settings.steps + 1)]
    rewards = [r["reward"] for r in rows]
    assert all(r["sampled_version"] == r["version"] - 1 for r in rows)  # each step sampled the previous step's weights
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert all(r["logprob_gap"] is None or r["logprob_gap"] < 0.1 for r in rows)  # bf16 sampler vs trainer
