"""Training memory and speed: peak memory and tokens/s of one ``forward_backward`` against batch size
and sequence length, on the default model, before (the one-shot path of commit 894a076: the whole
batch in one forward, float32 logits of every position) and after (micro-batches under
``COLO_MICROBATCH_TOKENS``, logprobs in chunks; without and with gradient checkpointing, the default).

Each measurement runs in a fresh process (the ``pytorch`` engine, no vLLM, so only training memory
counts): load the model, make a rank-16 LoRA on every linear layer, one small warm-up
``forward_backward``, then the measured one on ``batch`` datums of ``length`` random tokens with the
``importance_sampling`` loss. Peak memory is the process's peak RSS during the measured call minus its
RSS before it (on CUDA: peak allocated GPU memory); tokens/s is batch x length over the call's wall
time. ``--repeats`` processes per cell; the table gives the median time with its range and the
largest peak. The "before" rows check out the old commit into a temporary git worktree.

``--shared``: instead, 64 datums in 8 groups of 8 that share a prompt (GRPO's shape: random prompt tokens,
then each sample's own random completion), at the default budget, computed three ways: right-padded without
sharing (``--padded-commit``, the code before packing), packed without sharing (``share_prefixes=False``)
and packed with each shared prompt once (the default). Tokens/s counts every datum's tokens (the useful
work, equal on all rows). Its table goes to its own section.

    LD_PRELOAD=$(.venv/bin/colo allocator) .venv/bin/python benchmarks/train_memory.py [--repeats 2] [--device cpu|cuda] [--before 894a076]
    LD_PRELOAD=$(.venv/bin/colo allocator) .venv/bin/python benchmarks/train_memory.py --shared [--repeats 3] [--padded-commit 6b09bd8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine, table, write_section  # noqa: E402
from colo.allocator import preloaded  # noqa: E402

WORKLOAD = r"""
import json, sys, time
import torch
sys.path.insert(0, sys.argv[1])
from colo import Datum, Trainer

batch, length, device = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
settings = json.loads(sys.argv[5])
torch.set_num_threads(int(sys.argv[6]))
group, prompt = json.loads(sys.argv[7])  # samples per shared prompt (0: nothing shared) and its length

def memory_bytes(peak):  # peak (VmHWM) or current (VmRSS) resident memory; on CUDA, torch's allocated memory
    if device == "cuda":
        return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
    field = "VmHWM" if peak else "VmRSS"
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))

def data(n, width, gen, group=0, prompt=0):
    out = []
    for i in range(n):
        tokens = torch.randint(10, 40000, (width + 1,), generator=gen)
        if group:
            if i % group == 0:
                shared = tokens[:prompt]
            tokens[:prompt] = shared
        out.append(Datum(tokens[:-1].tolist(), {"target_tokens": tokens[1:], "logprobs": -torch.rand(width) * 4,
                                                "advantages": torch.randn(width, generator=gen)}))
    return out

trainer = Trainer(engine="pytorch", device=device, **settings)
adapter = trainer.create_lora(rank=16, seed=0)
gen = torch.Generator().manual_seed(0)
trainer.forward_backward(adapter, data(2, 16, gen), "importance_sampling")  # first-call allocations
work = data(batch, length, gen, group, prompt)
if device == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
base = memory_bytes(peak=False)
# VmHWM only grows: the peak of the measured call shows only if it exceeds what came before
started = time.perf_counter()
out = trainer.forward_backward(adapter, work, "importance_sampling")
if device == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - started
print("RESULT " + json.dumps({"seconds": seconds, "peak_bytes": memory_bytes(peak=True) - base,
                              "computed": out.metrics.get("tokens_computed:sum", batch * length)}))
"""

# (batch, length, micro-batch budget): the first two are the acceptance pair (64 datums under
# the budget 8 of them fill), the rest a grid over batch size and length at the default budget
SHAPES = [(8, 120, 960), (64, 120, 960), (8, 128, 4096), (32, 128, 4096), (64, 128, 4096), (8, 512, 4096),
          (8, 1024, 4096)]


def run(code_root: Path, batch: int, length: int, device: str, settings: dict, threads: int,
        preload: str | None = None, group: int = 0, prompt: int = 0) -> dict:
    """One measurement in a fresh process; ``preload``: its LD_PRELOAD (None: this process's)."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(WORKLOAD)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(code_root)}
    if preload is not None:
        env["LD_PRELOAD"] = preload
    proc = subprocess.run([sys.executable, f.name, str(code_root), str(batch), str(length), device,
                           json.dumps(settings), str(threads), json.dumps([group, prompt])],
                          capture_output=True, text=True, env=env)
    os.unlink(f.name)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"workload failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


@contextmanager
def old_worktree(ref: str) -> Iterator[Path | None]:
    """The repository at ``ref`` in a temporary git worktree (None when it cannot be checked out), removed after."""
    path = Path(tempfile.mkdtemp(prefix="colo-before-")) / "tree"
    proc = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref],
                          capture_output=True, text=True) if ref else None
    if proc is None or proc.returncode != 0:
        if proc is not None:
            print(f"cannot check out {ref}: {proc.stderr.strip()}; skipping its rows")
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--before", default="894a076", help="the commit to measure as 'before' ('' to skip)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--shared", action="store_true", help="64 datums in 8 groups sharing a prompt, 3 ways")
    parser.add_argument("--padded-commit", default="6b09bd8", help="--shared: the code before packing")
    args = parser.parse_args()
    if args.shared:
        shared(args)
        return

    rows, cells = [], {}
    with old_worktree(args.before) as before:
        variants = [("after, no grad ckpt", ROOT, {"gradient_checkpointing": False}),
                    ("after (default: grad ckpt)", ROOT, {"gradient_checkpointing": True})]
        if before is not None:
            variants.insert(0, (f"before ({args.before})", before, None))
        for batch, length, budget in SHAPES:
            for name, code_root, extra in variants:
                settings = {} if extra is None else {"microbatch_tokens": budget, **extra}
                runs = [run(code_root, batch, length, args.device, settings, args.threads) for _ in range(args.repeats)]
                seconds = sorted(r["seconds"] for r in runs)
                peak = max(r["peak_bytes"] for r in runs) / 2**30
                cells[(name, batch, length)] = peak
                tokens = batch * length
                rows.append([f"{batch} x {length}", budget if extra is not None else "one shot", name,
                             f"{peak:.2f}", f"{tokens / statistics.median(seconds):.0f}",
                             f"{tokens / seconds[-1]:.0f}-{tokens / seconds[0]:.0f}"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)

    headers = ["batch x length", "micro-batch tokens", "code", "peak GiB (above start)", "tokens/s (median)",
               "tokens/s (range)"]
    growth = []
    for name, _, _ in variants:
        few, many = cells.get((name, 8, 120)), cells.get((name, 64, 120))
        if few and many:
            growth.append([name, f"{few:.2f}", f"{many:.2f}", f"{many / few:.2f}x"])
    summary = table(["code", "8 x 120 peak GiB", "64 x 120 peak GiB", "64 / 8"], growth)
    print(summary)
    print(table(headers, rows))
    write_section("train_memory", f"""
## Training memory: forward_backward against batch size and length

Default model (SmolLM2-135M-Instruct, bf16, vocabulary 49,152), `pytorch` engine (no vLLM in the process),
LoRA rank 16 on every linear layer, `importance_sampling` on random tokens; {args.repeats} fresh process(es)
per row, {args.threads} threads, device {args.device}. Peak: the process's peak RSS during the one measured
`forward_backward` minus its RSS before it{' (CUDA: peak allocated)' if args.device == 'cuda' else ''}.
"before" is commit {args.before or '(skipped)'}: the whole batch in one forward with float32 logits of every
position; "after": micro-batches under `COLO_MICROBATCH_TOKENS` (the column) and logprobs in chunks.
Allocator: {preloaded()} (the same for every row).

Machine: {machine()}.

Memory against the number of datums at a fixed micro-batch budget (8 datums' tokens, 960):

{summary}

{table(headers, rows)}

Command: `{"LD_PRELOAD=$(.venv/bin/colo allocator) " if preloaded() == "mimalloc" else ""}.venv/bin/python benchmarks/train_memory.py --repeats {args.repeats} --device {args.device}`
""")


# (prompt, completion) tokens of each datum: arithmetic GRPO's (rl_step_vs_trl) and a long system prompt's
GROUP_SHAPES = [(45, 10), (400, 64)]


def shared(args) -> None:
    rows = []
    with old_worktree(args.padded_commit) as padded:
        variants = [("packed, each shared prompt once (default)", ROOT, {}),
                    ("packed, every datum in full", ROOT, {"share_prefixes": False})]
        if padded is not None:
            variants.append((f"right-padded, every datum in full ({args.padded_commit})", padded, {}))
        for prompt, completion in GROUP_SHAPES:
            length = prompt + completion
            useful = 64 * length
            for name, code_root, settings in variants:
                runs = [run(code_root, 64, length, args.device, settings, args.threads, group=8, prompt=prompt)
                        for _ in range(args.repeats)]
                seconds = sorted(r["seconds"] for r in runs)
                rows.append([f"8 x 8, {prompt} + {completion}", name, f"{int(runs[0]['computed']):,}",
                             f"{max(r['peak_bytes'] for r in runs) / 2**30:.2f}",
                             f"{statistics.median(seconds):.2f}", f"{seconds[0]:.2f}-{seconds[-1]:.2f}",
                             f"{useful / statistics.median(seconds):.0f}"])
                print(" | ".join(str(c) for c in rows[-1]), flush=True)
    headers = ["groups x samples, prompt + completion", "code", "tokens computed", "peak GiB (above start)",
               "seconds (median)", "seconds (range)", "useful tokens/s"]
    summary = table(headers, rows)
    print(summary)
    write_section("train_memory_shared", f"""
## Training on groups that share a prompt: shared once, in full, padded

Default model (SmolLM2-135M-Instruct, bf16), `pytorch` engine, LoRA rank 16 on every linear layer, one
`forward_backward` (`importance_sampling`) of 64 datums in 8 groups of 8 that share their prompt (random tokens;
each sample's completion its own), at the default budget (`COLO_MICROBATCH_TOKENS=4096`, gradient checkpointing
on); {args.repeats} fresh process(es) per row, {args.threads} threads, device {args.device}. "packed" is colo now (one
packed row per micro-batch, no padding); "right-padded" is the code before packing ({args.padded_commit}). "tokens
computed" is forward_backward's `tokens_computed` metric (the padded code: the datums' tokens, all of one length);
useful tokens/s counts every datum's tokens, the same work on every row. Peak: the process's peak RSS during the
call minus its RSS before it. Allocator: {preloaded()}.

Machine: {machine()}.

{summary}

Command: `{"LD_PRELOAD=$(.venv/bin/colo allocator) " if preloaded() == "mimalloc" else ""}.venv/bin/python benchmarks/train_memory.py --shared --repeats {args.repeats} --device {args.device}`
""")


if __name__ == "__main__":
    main()
