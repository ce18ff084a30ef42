"""The allocator's share of CPU training memory and time: one ``forward_backward`` of 64 sequences of
55 tokens (3,520 tokens, one micro-batch) on the default model under glibc's malloc and under the
mimalloc that colo's ``cpu`` extra installs (preloaded), with gradient checkpointing on and off.

Each measurement is a fresh process (``benchmarks/train_memory.py``'s workload: the ``pytorch`` engine,
rank-16 LoRA on every linear layer, a warm-up call, then the measured one); runs alternate between the
allocators, ``--repeats`` of each. Peak: peak RSS during the call minus RSS before it.

    .venv/bin/python benchmarks/allocator.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine, table, write_section  # noqa: E402
from benchmarks.train_memory import run  # noqa: E402
from colo.allocator import mimalloc_path  # noqa: E402

BATCH, LENGTH = 64, 55


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    mimalloc = mimalloc_path()
    if mimalloc is None:
        raise SystemExit("mimalloc is not installed: it comes with the cpu extra (make setup)")
    allocators = {"glibc malloc": "", "mimalloc": mimalloc}
    rows = []
    for checkpointing in (True, False):
        results: dict[str, list[dict]] = {name: [] for name in allocators}
        for _ in range(args.repeats):
            for name, preload in allocators.items():
                results[name].append(run(ROOT, BATCH, LENGTH, "cpu", {"gradient_checkpointing": checkpointing},
                                         args.threads, preload=preload))
        for name, runs in results.items():
            seconds = sorted(r["seconds"] for r in runs)
            peaks = sorted(r["peak_bytes"] / 2**30 for r in runs)
            rows.append(["on" if checkpointing else "off", name, f"{statistics.median(peaks):.2f}",
                         f"{peaks[0]:.2f}-{peaks[-1]:.2f}", f"{statistics.median(seconds):.2f}",
                         f"{seconds[0]:.2f}-{seconds[-1]:.2f}"])
            print(" | ".join(rows[-1]), flush=True)
    result = table(["grad ckpt", "allocator", "peak GiB (median)", "peak range", "seconds (median)", "seconds range"],
                   rows)
    print(result)
    write_section("allocator", f"""
## The allocator: glibc malloc vs mimalloc for CPU training

One `forward_backward` of {BATCH} sequences of {LENGTH} tokens ({BATCH * LENGTH} tokens, one micro-batch) on the
default model (bf16), `pytorch` engine, LoRA rank 16 on every linear layer, `importance_sampling`; each
measurement a fresh process, {args.repeats} per row, alternating allocators, {args.threads} threads. Peak: peak RSS
during the call minus RSS before it. mimalloc is `cmeel-mimalloc` (the `cpu` extra), preloaded with LD_PRELOAD.

Machine: {machine()}.

{result}

Command: `.venv/bin/python benchmarks/allocator.py --repeats {args.repeats}`
""")


if __name__ == "__main__":
    main()
