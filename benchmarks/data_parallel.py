"""Training steps per second with N ranks against one, on the same global batch.

Each configuration runs in fresh processes: ``python`` for one rank, ``torchrun --standalone
--nproc_per_node=N`` for N (gloo on CPU). The workload: the default model (pytorch engine), a rank-16 LoRA
on every linear layer, a global batch of ``--batch`` datums of ``--length`` random tokens with the
``cross_entropy`` loss; one warm-up step, then ``--steps`` timed steps of ``forward_backward`` +
``optim_step``. Threads: the machine's cores are shared out, ``cores / N`` per rank. Peak memory is the
largest peak RSS of any rank (each rank holds the whole model).

    LD_PRELOAD=$(.venv/bin/colo allocator) .venv/bin/python benchmarks/data_parallel.py [--ranks 1,2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine, table, write_section  # noqa: E402

WORKLOAD = r"""
import json, os, resource, sys, time
import torch
from colo import AdamParams, Datum, Trainer

out, batch, length, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
trainer = Trainer(engine="pytorch", max_lora_rank=16)
adapter = trainer.create_lora(rank=16, seed=0)
g = torch.Generator().manual_seed(0)
data = [Datum.from_sequence(torch.randint(0, trainer.policy.vocab_size, (length,), generator=g).tolist())
        for _ in range(batch)]
times = []
for step in range(steps + 1):
    started = time.perf_counter()
    trainer.forward_backward(adapter, data)
    trainer.optim_step(adapter, AdamParams(learning_rate=1e-4))
    times.append(time.perf_counter() - started)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
with open(f"{out}/rank-{trainer.ranks.rank}.json", "w") as f:
    json.dump({"step_seconds": times[1:], "peak_gib": peak, "world": trainer.ranks.world}, f)
trainer.close()
"""


def run(ranks: int, batch: int, length: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        script = Path(out) / "workload.py"
        script.write_text(WORKLOAD)
        threads = max(1, (os.cpu_count() or 1) // ranks)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        launcher = ([sys.executable] if ranks == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"])
        subprocess.run([*launcher, str(script), out, str(batch), str(length), str(steps)], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        parts = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank-*.json"))]
    assert len(parts) == ranks and all(p["world"] == ranks for p in parts)
    # a step ends for the job when its slowest rank ends it: every rank waits at the gradient sum
    step = [max(p["step_seconds"][i] for p in parts) for i in range(steps)]
    return {"seconds": statistics.median(step), "peak": max(p["peak_gib"] for p in parts), "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    counts = [int(x) for x in args.ranks.split(",")]
    cells: dict[int, list[dict]] = {n: [] for n in counts}
    for _ in range(args.repeats):  # configurations alternate, so drift in the machine hits each alike
        for n in counts:
            cells[n].append(run(n, args.batch, args.length, args.steps))
            print(f"{n} rank(s): {cells[n][-1]['seconds']:.2f} s/step, peak {cells[n][-1]['peak']:.2f} GiB", flush=True)
    base = statistics.median(c["seconds"] for c in cells[counts[0]])
    rows = []
    for n in counts:
        seconds = [c["seconds"] for c in cells[n]]
        median = statistics.median(seconds)
        rows.append([n, cells[n][0]["threads"], f"{median:.2f} ({min(seconds):.2f}-{max(seconds):.2f})",
                     f"{1 / median:.3f}", f"{base / median:.2f}x", f"{max(c['peak'] for c in cells[n]):.2f}"])
    headers = ["ranks", "threads per rank", "s/step (range)", "steps/s", f"vs {counts[0]} rank(s)", "peak RSS per rank, GiB"]
    print(table(headers, rows))
    write_section("data_parallel", f"""
## Data-parallel training: N ranks against one

One training step (`forward_backward` + `optim_step`) on a global batch of {args.batch} datums x {args.length}
random tokens, cross_entropy, rank-16 LoRA on every linear layer of the default model, pytorch engine;
median of {args.repeats} runs of {args.steps} timed steps after one warm-up (range in brackets), each run in
fresh processes (`torchrun --standalone`, gloo). The machine's cores are shared out among the ranks,
so on a small CPU more ranks mean fewer threads each: this measures the cost of the split and the
gradient sum, not a speed-up.

Machine: {machine()}.

{table(headers, rows)}

Command: `LD_PRELOAD=$(.venv/bin/colo allocator) .venv/bin/python benchmarks/data_parallel.py --ranks {args.ranks} --repeats {args.repeats}`
""")


if __name__ == "__main__":
    main()
