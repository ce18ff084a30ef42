"""A verifiable task for the demo, tests and benchmarks: "What is a + b?" with small numbers.

SmolLM2-135M-Instruct answers it right about a third of the time (greedy), which leaves RL room to
show a gain, and the reward is exact: the number the model gives after '=' (or its first number)
must be the sum.
"""

from __future__ import annotations

import random
import re


def split_questions(max_operand: int, held_out: int, rng: random.Random):
    """(train, held-out) lists of (a, b); a held-out pair is held out in both orders (a + b and b + a)."""
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(a, max_operand + 1)]
    rng.shuffle(pairs)
    both_orders = lambda ps: sorted({q for a, b in ps for q in ((a, b), (b, a))})  # noqa: E731
    return both_orders(pairs[held_out:]), both_orders(pairs[:held_out])


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}? Answer with just the number."


def prompt_tokens(tokenizer, a: int, b: int) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question(a, b)}], add_generation_prompt=True,
                                         return_dict=False)


def answer_of(text: str) -> int | None:
    """The model often restates the sum ("6 + 6 = 12"): read the number after '=', if any."""
    tail = text.split("=", 1)[1] if "=" in text else text
    match = re.search(r"-?\d+", tail)
    return int(match.group()) if match else None


def reward(text: str, a: int, b: int) -> float:
    return 1.0 if answer_of(text) == a + b else 0.0


def accuracy(trainer, adapter: str | None, questions, max_tokens: int = 12) -> float:
    """Share of ``questions`` answered right by greedy samples (stopping at a newline)."""
    from colo.types import SamplingParams

    prompts = [prompt_tokens(trainer.tokenizer, a, b) for a, b in questions]
    results = trainer.sample(adapter, prompts, 1, SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=["\n"]))
    return sum(reward(trainer.tokenizer.decode(r.sequences[0].tokens, skip_special_tokens=True), a, b)
               for r, (a, b) in zip(results, questions)) / len(questions)
