"""What the LoRA slot size (`COLO_MAX_LORA_RANK`) costs the vllm engine's sampling on this CPU.

vLLM sizes every LoRA slot to `max_lora_rank`; a smaller adapter is padded with zeros to it. Each
configuration runs in a fresh process (one vLLM engine per process), the configurations in turn and
in a rotated order each repeat; each process samples 32 chat prompts x 64 new tokens at most
(temperature 1, seeded) with one adapter and with 4 adapters mixed in one call, median of 3 runs after a
warm-up. Reported: generated tokens/s, the median over repeats with the range, and the process's peak RSS.

    .venv/bin/python benchmarks/lora_slot_rank.py [--repeats 2] [--slots 16,32,64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import machine, table, write_section  # noqa: E402

PROMPTS = 32


def child(slot: int, adapter_rank: int) -> None:
    from benchmarks import sampling_throughput as st
    from colo import Trainer

    st.RANK = adapter_rank
    trainer = Trainer(engine="vllm", max_lora_rank=slot, max_loras=4)
    names = st.adapters(trainer, 4)
    batch = st.prompts(trainer.tokenizer, PROMPTS)
    out = {}
    for mix in (1, 4):
        st.run(trainer, names[:mix], batch)  # warm-up of this shape
        rates = [tokens / seconds for seconds, tokens in (st.run(trainer, names[:mix], batch) for _ in range(3))]
        out[mix] = statistics.median(rates)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print("RESULT " + json.dumps({"one": out[1], "mixed": out[4], "peak_gib": hwm / 2**20}), flush=True)
    trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--slots", default="16,32,64")
    parser.add_argument("--child", nargs=2, type=int, metavar=("SLOT", "ADAPTER_RANK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    slots = [int(x) for x in args.slots.split(",")]
    configs = [(s, 16) for s in slots] + [(s, 32) for s in slots if s >= 32]
    results: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
    for rep in range(args.repeats):
        order = configs[rep % len(configs):] + configs[:rep % len(configs)]
        for slot, rank in order:
            proc = subprocess.run([sys.executable, __file__, "--child", str(slot), str(rank)], capture_output=True,
                                  text=True, env=os.environ)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"slot {slot} rank {rank} failed:\n{proc.stderr[-3000:]}")
            results[(slot, rank)].append(json.loads(line[7:]))
            print(f"repeat {rep}: slot {slot}, adapters of rank {rank}: {line[7:]}", flush=True)

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"

    base = {k: statistics.median(r[k] for r in results[(slots[0], 16)]) for k in ("one", "mixed")}
    rows = []
    for slot, rank in configs:
        rs = results[(slot, rank)]
        one, mixed = [r["one"] for r in rs], [r["mixed"] for r in rs]
        rows.append([slot, rank, cell(one), f"{statistics.median(one) / base['one']:.2f}x", cell(mixed),
                     f"{statistics.median(mixed) / base['mixed']:.2f}x",
                     f"{max(r['peak_gib'] for r in rs):.2f}"])
    headers = ["COLO_MAX_LORA_RANK (slot)", "adapter rank", "1 adapter tok/s (range)", "vs slot 16",
               "4 mixed tok/s (range)", "vs slot 16", "peak RSS GiB"]
    print(table(headers, rows))
    write_section("lora_slot_rank", f"""
## LoRA slot size: what `COLO_MAX_LORA_RANK` costs vllm sampling on CPU

vLLM pads every adapter to the slot rank (`COLO_MAX_LORA_RANK`). {PROMPTS} chat prompts, one sample each, at
most 64 new tokens, temperature 1, seeded, the default model (bf16), LoRA on all linear layers; "4 mixed": prompt i
uses adapter i mod 4 in one call. Median of {args.repeats} fresh processes (range in brackets), each the median
of 3 runs after a warm-up; configurations alternate, in a rotated order each repeat.

Machine: {machine()}.

{table(headers, rows)}

Command: `.venv/bin/python benchmarks/lora_slot_rank.py --repeats {args.repeats} --slots {args.slots}`
""")


if __name__ == "__main__":
    main()
