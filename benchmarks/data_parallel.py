"""Training steps per second and memory per rank with N ranks against one, on the same global batch: the base
whole on every rank (plain data parallel) and sharded across the ranks (``COLO_SHARD_BASE``, FSDP2).

Each configuration runs in fresh processes: ``python`` for one rank, ``torchrun --standalone
--nproc_per_node=N`` for N (gloo on CPU, nccl on GPUs). The workload: the default model (or ``--model``), a
rank-16 LoRA on every linear layer, a global batch of ``--batch`` datums of ``--length`` random tokens with
the ``cross_entropy`` loss; one warm-up step, then ``--steps`` timed steps of ``forward_backward`` +
``optim_step``. Every configuration samples through the vllm engine, tensor parallel over its ranks (a
sharded base needs it: the pytorch engine samples from the training model), so each holds the same sampler.
Threads: the machine's cores are shared out, ``cores / N`` per rank. Per rank: the base parameter bytes it
holds (measured: the storage of its tensors or shards), and the largest peak RSS of any rank.

    LD_PRELOAD=$(.venv/bin/colo allocator) .venv/bin/python benchmarks/data_parallel.py [--configs 1,2,2s] [--repeats 2]

On a machine with N GPUs: ``--configs 1,N,Ns --device cuda`` (peak memory is then the GPU's, per rank).
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

from benchmarks.model_sizes import CONFIGS, build  # noqa: E402
from benchmarks.report import machine, table, write_section  # noqa: E402

WORKLOAD = r"""
import json, os, resource, sys, time
import torch
from colo import AdamParams, Datum, Trainer

out, batch, length, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
shard, device, model = sys.argv[5] == "sharded", sys.argv[6], sys.argv[7]
world = int(os.environ.get("WORLD_SIZE", "1"))
trainer = Trainer(model=model, engine="vllm", max_lora_rank=16, tensor_parallel_size=world, shard_base=shard, device=device,
                  gpu_memory_utilization=0.3)
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
if device == "cuda":
    peak = torch.cuda.max_memory_allocated() / 2**30
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
with open(f"{out}/rank-{trainer.ranks.rank}.json", "w") as f:
    json.dump({"step_seconds": times[1:], "peak_gib": peak, "world": trainer.ranks.world,
               "base_gib": trainer.policy.base_bytes() / 2**30, "sharded": trainer.policy.sharded}, f)
trainer.close()
"""


def run(ranks: int, sharded: bool, batch: int, length: int, steps: int, device: str, model: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        script = Path(out) / "workload.py"
        script.write_text(WORKLOAD)
        threads = max(1, (os.cpu_count() or 1) // ranks)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"}
        launcher = ([sys.executable] if ranks == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"])
        subprocess.run([*launcher, str(script), out, str(batch), str(length), str(steps),
                        "sharded" if sharded else "whole", device, model], check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        parts = [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank-*.json"))]
    assert len(parts) == ranks and all(p["world"] == ranks and p["sharded"] == (sharded and ranks > 1) for p in parts)
    # a step ends for the job when its slowest rank ends it: every rank waits at the gradient sum
    step = [max(p["step_seconds"][i] for p in parts) for i in range(steps)]
    return {"seconds": statistics.median(step), "peak": max(p["peak_gib"] for p in parts), "threads": threads,
            "base": max(p["base_gib"] for p in parts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="1,2,2s", help="rank counts; a trailing s: the base sharded")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="default",
                        help="default, a configuration of benchmarks/model_sizes.py (random weights), or a directory")
    args = parser.parse_args()
    model = args.model if Path(args.model).is_dir() else build(args.model, Path(tempfile.gettempdir()) / "colo-bench")
    configs = [(int(c.rstrip("s")), c.endswith("s")) for c in args.configs.split(",")]
    cells: dict[tuple[int, bool], list[dict]] = {c: [] for c in configs}
    for _ in range(args.repeats):  # configurations alternate, so drift in the machine hits each alike
        for c in configs:
            cells[c].append(run(*c, args.batch, args.length, args.steps, args.device, model))
            print(f"{c[0]} rank(s){' sharded' if c[1] else ''}: {cells[c][-1]['seconds']:.2f} s/step, "
                  f"base {cells[c][-1]['base']:.3f} GiB, peak {cells[c][-1]['peak']:.2f} GiB", flush=True)
    base = statistics.median(c["seconds"] for c in cells[configs[0]])
    rows = []
    for c in configs:
        seconds = [x["seconds"] for x in cells[c]]
        median = statistics.median(seconds)
        rows.append([c[0], "sharded (FSDP2)" if c[1] else "whole", cells[c][0]["threads"],
                     f"{median:.2f} ({min(seconds):.2f}-{max(seconds):.2f})", f"{1 / median:.3f}",
                     f"{base / median:.2f}x", f"{cells[c][0]['base']:.3f}", f"{max(x['peak'] for x in cells[c]):.2f}"])
    peak_name = "peak GPU memory per rank, GiB" if args.device == "cuda" else "peak RSS per rank, GiB"
    headers = ["ranks", "base", "threads per rank", "s/step (range)", "steps/s", "vs the first", "base held per rank, GiB",
               peak_name]
    print(table(headers, rows))
    write_section("data_parallel", f"""
## Several ranks: the base whole on each (data parallel) or sharded across them (COLO_SHARD_BASE)

One training step (`forward_backward` + `optim_step`) on a global batch of {args.batch} datums x {args.length}
random tokens, cross_entropy, rank-16 LoRA on every linear layer of {described(args.model)}, the vllm engine
(tensor parallel over the ranks) beside it in every row; median of {args.repeats} runs of {args.steps} timed
steps after one warm-up (range in brackets), each run in fresh processes (`torchrun --standalone`, gloo). The
machine's cores are shared out among the ranks, so on a small CPU more ranks mean fewer threads each: this
measures the cost of the split, the gradient sum and, sharded, the per-layer gathers; not a speed-up. "Base
held" is measured: the bytes of the base's parameter storage a rank holds (its shards, when sharded). Peak
RSS includes the sampler's own copy of its weights.

Machine: {machine()}.

{table(headers, rows)}

Command: `LD_PRELOAD=$(.venv/bin/colo allocator) .venv/bin/python benchmarks/data_parallel.py --model {args.model} --configs {args.configs} --repeats {args.repeats}`;
on a machine with N GPUs: `.venv/bin/python benchmarks/data_parallel.py --model MODEL --configs 1,N,Ns --device cuda`.
""")


def described(model: str) -> str:
    if model in CONFIGS:
        return f"a {model} configuration (random weights, bf16; its attention heads divide over 2 ranks, the default model's 9 do not)"
    return "the default model" if model == "default" else f"`{model}`"


if __name__ == "__main__":
    main()
