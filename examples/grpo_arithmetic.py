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

import json
import os
import random
import resource
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from colo import AdamParams, SamplingParams, Trainer
from colo.recipes.arithmetic_task import accuracy, prompt_tokens, reward, split_questions
from colo.recipes.rl import grpo_step
from colo.recipes.script_flags import parse_settings


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


def sampling(settings: Settings, step: int) -> SamplingParams:
    return SamplingParams(max_tokens=settings.max_tokens, temperature=1.0, stop=["\n"], seed=settings.seed + step)


def train_step(trainer: Trainer, adapter: str, questions, settings: Settings, step: int) -> dict:
    """Sample a group per question, reward the exact sum, train on group-relative advantages, publish."""
    tok = trainer.tokenizer
    prompts = [prompt_tokens(tok, a, b) for a, b in questions]

    def score(i: int, tokens: list[int]) -> float:
        return reward(tok.decode(tokens, skip_special_tokens=True), *questions[i])

    out = grpo_step(trainer, adapter, prompts, score, settings.group_size, sampling(settings, step),
                    AdamParams(learning_rate=settings.learning_rate))
    return {
        "step": step,
        "version": out.version,
        "sampled_version": out.sampled_version,
        "reward": out.mean_reward,
        "trained_sequences": out.trained_sequences,
        "logprob_gap": out.logprob_gap,
        "sample_seconds": out.sample_seconds,
        "train_seconds": out.train_seconds,
        "publish_seconds": out.publish_seconds,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gpu_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


# ---- the run ----------------------------------------------------------------------------------

def plot(rows: list[dict], evals: list[tuple[int, float]], path: Path, engine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], label="reward (training samples, T=1)")
    ax.plot([s for s, _ in evals], [a for _, a in evals], "o-", label="held-out accuracy (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.set_title(f"GRPO on addition, SmolLM2-135M-Instruct + LoRA ({engine} engine)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    settings = parse_settings(Settings, __doc__.splitlines()[0])
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(settings.seed)
    train, held_out = split_questions(settings.max_operand, settings.held_out, rng)

    trainer = Trainer.from_env()
    # under torchrun with several ranks every rank runs this same script (the Trainer splits the work and
    # returns the same results everywhere); rank 0 alone prints and writes files
    main_rank = trainer.ranks.main
    say = print if main_rank else (lambda *_: None)
    adapter = trainer.create_lora(rank=settings.rank, seed=settings.seed)
    say(f"engine {trainer.engine.name}, model {trainer.model_path}, {len(train)} training and "
          f"{len(held_out)} held-out questions")

    before = accuracy(trainer, adapter, held_out, settings.max_tokens)
    evals = [(0, before)]
    say(f"held-out accuracy before training: {before:.1%}")

    rows = []
    with open(out / "metrics.jsonl" if main_rank else os.devnull, "w") as log, \
            tqdm(range(1, settings.steps + 1), desc="GRPO", unit="step", disable=not main_rank) as bar:
        for step in bar:
            row = train_step(trainer, adapter, rng.sample(train, settings.questions_per_step), settings, step)
            if step % settings.eval_every == 0 or step == settings.steps:
                row["held_out_accuracy"] = accuracy(trainer, adapter, held_out, settings.max_tokens)
                evals.append((step, row["held_out_accuracy"]))
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(reward=f"{row['reward']:.2f}", held_out=f"{evals[-1][1]:.2f}",
                            sample=f"{row['sample_seconds']:.1f}s", train=f"{row['train_seconds']:.1f}s")

    after = evals[-1][1]
    engine = trainer.engine.name
    trainer.close()
    if not main_rank:
        return
    plot(rows, evals, out / "reward_accuracy.png", engine)
    summary = {"held_out_accuracy_before": before, "held_out_accuracy_after": after,
               "gain_points": 100 * (after - before), "settings": asdict(settings)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"held-out accuracy: {before:.1%} before, {after:.1%} after ({100 * (after - before):+.1f} points)")
    print(f"metrics: {out / 'metrics.jsonl'}  plot: {out / 'reward_accuracy.png'}")


if __name__ == "__main__":
    main()
