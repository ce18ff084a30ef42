"""Supervised fine-tuning of a LoRA adapter on a small generated data set, with its loss curve.

The data: "What is a + b?" questions (the task of grpo_arithmetic.py) answered "a + b = c", the
loss on the answer tokens only. Trains in mini-batches, logs the loss per token of each step to a
JSONL file, plots the curve, and measures held-out accuracy (greedy, questions never trained on)
before and after.

    python examples/sft.py                       # or under torchrun --nproc_per_node=1
    python examples/sft.py --steps 20 --out runs/sft_quick
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from colo import AdamParams, Datum, Trainer
from colo.recipes.arithmetic_task import accuracy, prompt_tokens, split_questions
from colo.recipes.script_flags import parse_settings


@dataclass
class Settings:
    steps: int = 30
    batch_size: int = 16
    learning_rate: float = 5e-4
    rank: int = 16
    max_operand: int = 19
    held_out: int = 40
    seed: int = 0
    out: str = "runs/sft"


def example(tokenizer, a: int, b: int) -> Datum:
    prompt = prompt_tokens(tokenizer, a, b)
    answer = tokenizer.encode(f"{a} + {b} = {a + b}", add_special_tokens=False) + [tokenizer.eos_token_id]
    return Datum.from_sequence(prompt + answer, weights=[0] * len(prompt) + [1] * len(answer))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss_per_token"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("loss per answer token")
    ax.set_yscale("log")
    ax.set_title("SFT on addition, SmolLM2-135M-Instruct + LoRA")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    settings = parse_settings(Settings, __doc__.splitlines()[0])
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(settings.seed)
    train, held_out = split_questions(settings.max_operand, settings.held_out, rng)
    trainer = Trainer.from_env()
    tok = trainer.tokenizer
    adapter = trainer.create_lora(rank=settings.rank, seed=settings.seed)

    before = accuracy(trainer, adapter, held_out)
    print(f"held-out accuracy before training: {before:.1%}")
    rows = []
    with open(out / "metrics.jsonl", "w") as log, tqdm(range(1, settings.steps + 1), desc="SFT", unit="step") as bar:
        for step in bar:
            batch = [example(tok, a, b) for a, b in rng.sample(train, settings.batch_size)]
            started = time.perf_counter()
            result = trainer.forward_backward(adapter, batch, "cross_entropy")
            trainer.optim_step(adapter, AdamParams(learning_rate=settings.learning_rate))
            n_tokens = sum(float(d.loss_fn_inputs["weights"].sum()) for d in batch)
            row = {"step": step, "loss_per_token": result.metrics["loss:sum"] / n_tokens,
                   "seconds": time.perf_counter() - started}
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss_per_token']:.3f}")
    after = accuracy(trainer, adapter, held_out)
    plot(rows, out / "loss.png")
    (out / "summary.json").write_text(json.dumps(
        {"held_out_accuracy_before": before, "held_out_accuracy_after": after, "settings": asdict(settings)}, indent=2))
    trainer.close()
    print(f"held-out accuracy: {before:.1%} before, {after:.1%} after; loss curve: {out / 'loss.png'}")


if __name__ == "__main__":
    main()
