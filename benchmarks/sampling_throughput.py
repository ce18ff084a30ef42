"""Sampling throughput of colo's engines against plain transformers + PEFT ``generate``, on the same model
and adapters, with one adapter and with four adapters mixed in one batch.

Sides (``--sides``), all in this one process, one configuration after the other:
- ``pytorch``: colo's pytorch engine (samples from the training model itself);
- ``vllm``: colo's in-process vLLM engine (not on a machine without vLLM);
- ``generate``: ``generate(do_sample=True)`` through the same PEFT model, the Hugging Face reference
  (dynamic cache; four adapters through PEFT's ``adapter_names``);
- ``pytorch`` before: the pytorch engine of an older commit (``--before``, checked out into a temporary
  git worktree and measured first, in a process of its own, by this same script).

Each cell: N chat prompts ("What is a + b?"), one sample each, 64 new tokens at most, temperature 1,
seeded; generated tokens per second of wall time and milliseconds per decode step, median over the
repeats (range in brackets), after a warm-up of each shape. For the pytorch engine the gap between the
logprobs it reports and the trainer's own logprobs of the same tokens is measured on the last run.

    .venv/bin/python benchmarks/sampling_throughput.py [--repeats 3] [--prompts 8,32,128]
        [--sides pytorch,vllm,generate] [--device cpu|cuda] [--model PATH] [--before 5316fd7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.report import machine, table, write_section  # noqa: E402
from colo import AdamParams, Datum, SamplingParams, Trainer  # noqa: E402
from colo.types import SampleJob  # noqa: E402

NEW_TOKENS = 64
RANK = 16


def prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": f"What is {i % 17} + {i % 13}?"}],
                                          add_generation_prompt=True, return_dict=False) for i in range(n)]


def adapters(trainer: Trainer, n: int) -> list[str]:
    made = []
    for seed in range(n):
        a = trainer.create_lora(rank=RANK, seed=seed)
        tokens = trainer.tokenizer.encode(f"adapter {seed} says hello")
        trainer.forward_backward(a, [Datum.from_sequence(tokens)])
        trainer.optim_step(a, AdamParams(learning_rate=1e-3))  # lora_B no longer zero
        made.append(a)
    return made


def colo_run(trainer: Trainer, names: list[str], batch: list[list[int]]):
    jobs = [SampleJob(names[i % len(names)], p, 1, SamplingParams(max_tokens=NEW_TOKENS, seed=i))
            for i, p in enumerate(batch)]
    started = time.perf_counter()
    results = trainer.sample_batch(jobs)
    seconds = time.perf_counter() - started
    steps = max(len(r.sequences[0].tokens) for r in results)
    return seconds, sum(len(r.sequences[0].tokens) for r in results), steps, (jobs, results)


def generate_run(trainer: Trainer, names: list[str], batch: list[list[int]]):
    """Plain ``generate`` through the trainer's PEFT model: left-padded batch, sampling at temperature 1."""
    policy = trainer.policy
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), policy.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, p in enumerate(batch):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    ids, mask = ids.to(policy.device), mask.to(policy.device)
    kwargs = {}
    if len(names) > 1:  # PEFT's own mixed batch; the active adapter is then ignored
        kwargs["adapter_names"] = [names[i % len(names)] for i in range(len(batch))]
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.no_grad(), policy.active(names[0]) as model:
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=NEW_TOKENS, pad_token_id=policy.pad_token_id, **kwargs)
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    new = out[:, width:]
    eos = torch.tensor(sorted(policy.eos_token_ids), device=new.device)
    ended = torch.isin(new, eos)
    # a row's tokens run up to and including its first end-of-sequence token
    lengths = torch.where(ended.any(-1), ended.float().argmax(-1) + 1, torch.full_like(ended[:, 0], new.shape[1],
                                                                                       dtype=torch.long))
    return seconds, int(lengths.sum()), new.shape[1], None


def logprob_gap(trainer: Trainer, run) -> tuple[float, float]:
    jobs, results = run
    gaps = []
    for job, result in zip(jobs, results):
        seq = result.sequences[0]
        if not seq.tokens:
            continue
        own = trainer.compute_logprobs(job.adapter, list(job.prompt) + seq.tokens)[len(job.prompt):]
        gaps += [abs(a - b) for a, b in zip(own, seq.logprobs)]
    return statistics.mean(gaps), max(gaps)


def measure_before(args) -> dict[str, list[float]]:
    """The pytorch engine of commit ``args.before``: this script run in a worktree of it, pytorch side only."""
    root = Path(__file__).resolve().parents[1]
    tree = Path(tempfile.mkdtemp(prefix="colo-before-")) / "tree"
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tree), args.before], check=True,
                   capture_output=True)
    try:
        script = tree / "benchmarks" / "sampling_throughput_now.py"  # this script, importing the old colo
        shutil.copy(__file__, script)
        out = tree / "before.json"
        command = [sys.executable, str(script), "--sides", "pytorch", "--prompts", args.prompts, "--repeats",
                   str(args.repeats), "--device", args.device, "--before", "", "--json", str(out)]
        if args.model:
            command += ["--model", args.model]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        subprocess.run(command, check=True, env=env)
        return json.loads(out.read_text())
    finally:
        subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", default="8,32,128")
    parser.add_argument("--sides", default="pytorch,vllm,generate")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default=None, help="a model folder (default: colo's default model)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    parser.add_argument("--before", default="5316fd7",
                        help="the commit whose pytorch engine is measured as 'before' ('' to skip)")
    parser.add_argument("--json", help=argparse.SUPPRESS)  # where a 'before' run leaves its figures
    args = parser.parse_args()
    before = measure_before(args) if args.before and "pytorch" in args.sides.split(",") else {}
    sizes = [int(x) for x in args.prompts.split(",")]
    sides = args.sides.split(",")
    extra = {"model": args.model} if args.model else {}

    engines = {"vllm": "vllm", "pytorch": "pytorch", "generate": "pytorch"}
    trainers: dict[str, Trainer] = {}
    for side in sides:
        engine = engines[side]
        if engine not in trainers:
            trainers[engine] = Trainer(engine=engine, max_lora_rank=RANK, max_loras=4, device=args.device, **extra)
    names = {engine: adapters(t, 4) for engine, t in trainers.items()}
    first = next(iter(trainers.values()))
    model = first.model_path.rsplit("/", 1)[-1]
    dtype = str(first.policy.dtype).removeprefix("torch.")
    device = first.policy.device

    def one(side: str, mix: int, batch: list[list[int]]):
        trainer = trainers[engines[side]]
        run = generate_run if side == "generate" else colo_run
        if device.type == "cuda":
            torch.cuda.synchronize()
        return run(trainer, names[engines[side]][:mix], batch)

    rows, figures = [], {}
    for n in sizes:
        for mix in (1, 4):
            cell: dict[str, tuple[float, float, float, float]] = {}
            gap = None
            for side in sides:
                one(side, mix, prompts(first.tokenizer, n))  # warm-up of this shape
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                runs = [one(side, mix, prompts(first.tokenizer, n)) for _ in range(args.repeats)]
                rates = [tokens / seconds for seconds, tokens, _, _ in runs]
                step_ms = [1000 * seconds / steps for seconds, _, steps, _ in runs]
                cell[side] = (statistics.median(rates), min(rates), max(rates), statistics.median(step_ms))
                if side == "pytorch":
                    gap = logprob_gap(trainers["pytorch"], runs[-1][3])
                peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
                print(f"{n} prompts, {mix} adapter(s), {side}: {cell[side][0]:.0f} tok/s "
                      f"({cell[side][1]:.0f}-{cell[side][2]:.0f}), {cell[side][3]:.1f} ms/step{peak}", flush=True)
            row: list[object] = [n, mix]
            if before:
                median, low, high, ms = before[f"{n},{mix}"]
                row.append(f"{median:.0f} ({low:.0f}-{high:.0f}), {ms:.1f} ms")
            for side in sides:
                median, low, high, ms = cell[side]
                row.append(f"{median:.0f} ({low:.0f}-{high:.0f}), {ms:.1f} ms")
            if before:
                row.append(f"{cell['pytorch'][0] / before[f'{n},{mix}'][0]:.2f}x")
            if args.json:
                figures[f"{n},{mix}"] = cell["pytorch"]
            if "pytorch" in cell:
                for side in sides:
                    if side != "pytorch":
                        row.append(f"{cell['pytorch'][0] / cell[side][0]:.2f}x")
                row.append(f"{gap[0]:.1e} / {gap[1]:.1e}" if gap else "")
            rows.append(row)
    for t in trainers.values():
        t.close()
    if args.json:
        Path(args.json).write_text(json.dumps(figures))
        return
    headers = ["prompts", "adapters mixed"] + ([f"pytorch before ({args.before}) tok/s, ms/step"] if before else [])
    headers += [f"{s} tok/s, ms/step" for s in sides] + (["pytorch / before"] if before else [])
    if "pytorch" in sides:
        headers += [f"pytorch / {s}" for s in sides if s != "pytorch"] + ["pytorch logprob gap mean / max"]
    print(table(headers, rows))
    if args.no_write:
        return
    write_section("sampling_throughput", f"""
## Sampling throughput: pytorch engine, vllm engine, transformers `generate`

Generated tokens per second, median of {args.repeats} runs after a warm-up of each shape (range in
brackets), and milliseconds per decode step (wall time / longest sequence). {model} ({dtype}, {device.type}),
LoRA rank {RANK} on all linear layers, one sample per prompt, at most {NEW_TOKENS} new tokens, temperature 1,
seeded. "4 adapters mixed": prompt i uses adapter i mod 4, all in one `sample_batch` call (one
`generate` call with PEFT's `adapter_names`). All sides in one process, measured one after the other.
Logprob gap: |logprob the pytorch engine reported - trainer's `compute_logprobs`| over the sampled tokens.

Machine: {machine()}.

{table(headers, rows)}

Command: `LD_PRELOAD=$(.venv/bin/colo allocator) .venv/bin/python benchmarks/sampling_throughput.py --repeats {args.repeats} --prompts {args.prompts} --sides {args.sides} --before {args.before}`
""")


if __name__ == "__main__":
    main()
