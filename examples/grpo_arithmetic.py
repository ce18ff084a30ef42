"""GRPO on small-number addition, sampled through the colocated vLLM engine.

Each step: sample a group of completions per question from the adapter's newest version, reward
the exact answer, centre rewards within each group (group-relative advantages), train with the
`importance_sampling` loss on the sampler's own logprobs, and publish the next adapter version,
which the next step samples. Logs one JSON line per step (reward, held-out accuracy when measured,
sampler/trainer logprob gap, seconds spent sampling / training / publishing, memory) and ends with
a plot and the held-out accuracy before and after training.

    python examples/grpo_arithmetic.py                 # or under torchrun --nproc_per_node=1
    python examples/grpo_arithmetic.py --steps 10 --out runs/quick
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from colo import AdamParams, Datum, SamplingParams, Trainer


@dataclass
class Settings:
    steps: int = 20
    questions_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 12
    learning_rate: float = 5e-4
    rank: int = 16
    max_operand: int = 19  # questions "What is a + b?" with a, b in 0..max_operand
    held_out: int = 40  # unordered pairs {a, b} never trained on, in either order
    eval_every: int = 5
    seed: int = 0
    out: str = "runs/grpo_arithmetic"


# ---- the task ---------------------------------------------------------------------------------

def split_questions(max_operand: int, held_out: int, rng: random.Random):
    """(train, held-out) questions; a held-out pair is held out in both orders (a + b and b + a)."""
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(a, max_operand + 1)]
    rng.shuffle(pairs)
    both_orders = lambda ps: sorted({q for a, b in ps for q in ((a, b), (b, a))})  # noqa: E731
    return both_orders(pairs[held_out:]), both_orders(pairs[:held_out])


def prompt_tokens(tokenizer, a: int, b: int) -> list[int]:
    question = f"What is {a} + {b}? Answer with just the number."
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         return_dict=False)


def answer_of(text: str) -> int | None:
    """The model often restates the sum ("6 + 6 = 12"): read the number after '=', if any."""
    tail = text.split("=", 1)[1] if "=" in text else text
    match = re.search(r"-?\d+", tail)
    return int(match.group()) if match else None


def reward(tokenizer, tokens: list[int], a: int, b: int) -> float:
    return 1.0 if answer_of(tokenizer.decode(tokens, skip_special_tokens=True)) == a + b else 0.0


def sampling(settings: Settings, step: int | None) -> SamplingParams:
    if step is None:  # evaluation: greedy
        return SamplingParams(max_tokens=settings.max_tokens, temperature=0.0, stop=["\n"])
    return SamplingParams(max_tokens=settings.max_tokens, temperature=1.0, stop=["\n"], seed=settings.seed + step)


def accuracy(trainer: Trainer, adapter: str, questions, settings: Settings) -> float:
    prompts = [prompt_tokens(trainer.tokenizer, a, b) for a, b in questions]
    results = trainer.sample(adapter, prompts, 1, sampling(settings, None))
    return sum(reward(trainer.tokenizer, r.sequences[0].tokens, a, b)
               for r, (a, b) in zip(results, questions)) / len(questions)


# ---- one GRPO step ----------------------------------------------------------------------------

def rl_datum(prompt: list[int], tokens: list[int], sampler_logprobs: list[float], advantage: float) -> Datum:
    """Score the completion only: the prompt positions get zero advantage."""
    sequence = prompt + tokens
    n_prompt = len(prompt) - 1  # positions whose target is still a prompt token
    return Datum(
        model_input=sequence[:-1],
        loss_fn_inputs={
            "target_tokens": torch.tensor(sequence[1:]),
            "logprobs": torch.tensor([0.0] * n_prompt + sampler_logprobs),
            "advantages": torch.tensor([0.0] * n_prompt + [advantage] * len(tokens)),
        },
    )


def train_step(trainer: Trainer, adapter: str, questions, settings: Settings, step: int) -> dict:
    tok = trainer.tokenizer
    prompts = [prompt_tokens(tok, a, b) for a, b in questions]

    started = time.perf_counter()
    results = trainer.sample(adapter, prompts, settings.group_size, sampling(settings, step))
    sample_seconds = time.perf_counter() - started

    data, rewards, sampled = [], [], []
    for prompt, result, (a, b) in zip(prompts, results, questions):
        group = [reward(tok, s.tokens, a, b) for s in result.sequences]
        rewards += group
        mean = sum(group) / len(group)
        for seq, r in zip(result.sequences, group):
            if r != mean:  # a group whose samples all score the same teaches nothing
                data.append(rl_datum(prompt, seq.tokens, seq.logprobs, r - mean))
                sampled.append(seq.logprobs)

    started = time.perf_counter()
    gap = None
    if data:
        out = trainer.forward_backward(adapter, data, "importance_sampling")
        # the trainer's logprobs of the sampled tokens, under the version that sampled them
        diffs = [abs(t - s) for o, lp in zip(out.loss_fn_outputs, sampled)
                 for t, s in zip(o["logprobs"][-len(lp):].tolist(), lp)]
        gap = sum(diffs) / len(diffs)
    step_out = trainer.optim_step(adapter, AdamParams(learning_rate=settings.learning_rate))
    train_seconds = time.perf_counter() - started
    publish_seconds = step_out.metrics["publish_seconds:sum"]

    return {
        "step": step,
        "version": step_out.version,
        "sampled_version": results[0].adapter_version,
        "reward": sum(rewards) / len(rewards),
        "trained_sequences": len(data),
        "logprob_gap": gap,
        "sample_seconds": sample_seconds,
        "train_seconds": train_seconds - publish_seconds,
        "publish_seconds": publish_seconds,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gpu_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


# ---- the run ----------------------------------------------------------------------------------

def plot(rows: list[dict], evals: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], label="reward (training samples, T=1)")
    ax.plot([s for s, _ in evals], [a for _, a in evals], "o-", label="held-out accuracy (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.set_title("GRPO on addition, SmolLM2-135M-Instruct + LoRA (colocated vLLM)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_settings(cls, description: str):
    """A command-line flag for each field of the settings dataclass ``cls``."""
    parser = argparse.ArgumentParser(description=description)
    for name, default in asdict(cls()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return cls(**vars(parser.parse_args()))


def main() -> None:
    settings = parse_settings(Settings, __doc__.splitlines()[0])
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(settings.seed)
    train, held_out = split_questions(settings.max_operand, settings.held_out, rng)

    trainer = Trainer.from_env()
    adapter = trainer.create_lora(rank=settings.rank, seed=settings.seed)
    print(f"engine {trainer.engine.name}, model {trainer.model_path}, {len(train)} training and "
          f"{len(held_out)} held-out questions")

    before = accuracy(trainer, adapter, held_out, settings)
    evals = [(0, before)]
    print(f"held-out accuracy before training: {before:.1%}")

    rows = []
    with open(out / "metrics.jsonl", "w") as log, tqdm(range(1, settings.steps + 1), desc="GRPO", unit="step") as bar:
        for step in bar:
            row = train_step(trainer, adapter, rng.sample(train, settings.questions_per_step), settings, step)
            if step % settings.eval_every == 0 or step == settings.steps:
                row["held_out_accuracy"] = accuracy(trainer, adapter, held_out, settings)
                evals.append((step, row["held_out_accuracy"]))
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(reward=f"{row['reward']:.2f}", held_out=f"{evals[-1][1]:.2f}",
                            sample=f"{row['sample_seconds']:.1f}s", train=f"{row['train_seconds']:.1f}s")

    after = evals[-1][1]
    plot(rows, evals, out / "reward_accuracy.png")
    summary = {"held_out_accuracy_before": before, "held_out_accuracy_after": after,
               "gain_points": 100 * (after - before), "settings": asdict(settings)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    trainer.close()
    print(f"held-out accuracy: {before:.1%} before, {after:.1%} after ({100 * (after - before):+.1f} points)")
    print(f"metrics: {out / 'metrics.jsonl'}  plot: {out / 'reward_accuracy.png'}")


if __name__ == "__main__":
    main()
