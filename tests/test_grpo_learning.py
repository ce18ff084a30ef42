"""A short GRPO run on the real default model (SmolLM2-135M-Instruct) through the colocated vLLM
engine: the reward must rise. Marked slow (about 3 minutes on 2 cores); `make test` runs it,
`make test-fast` leaves it out."""

import random

import pytest

from colo import AdamParams, SamplingParams
from colo.recipes.arithmetic_task import prompt_tokens, reward, split_questions
from colo.recipes.rl import grpo_step


@pytest.mark.slow
def test_grpo_reward_rises_on_the_default_model():
    from colo import Trainer

    rng = random.Random(0)
    train, _ = split_questions(19, 40, rng)
    rows = []
    with Trainer(engine="vllm") as trainer:
        tok = trainer.tokenizer
        adapter = trainer.create_lora(rank=16, seed=0)
        for step in range(1, 9):
            questions = rng.sample(train, 6)
            rows.append(grpo_step(
                trainer, adapter, [prompt_tokens(tok, a, b) for a, b in questions],
                lambda i, tokens: reward(tok.decode(tokens, skip_special_tokens=True), *questions[i]),  # noqa: B023
                group_size=8, sampling=SamplingParams(max_tokens=12, temperature=1.0, stop=["\n"], seed=step),
                adam=AdamParams(learning_rate=5e-4)))
    rewards = [r.mean_reward for r in rows]
    assert all(r.sampled_version == r.version - 1 for r in rows)  # each step sampled the previous step's weights
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert all(r.logprob_gap is None or r.logprob_gap < 0.1 for r in rows)  # bf16 sampler vs trainer
