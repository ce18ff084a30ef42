"""Sampling throughput: the colocated ``vllm`` engine vs the ``pytorch`` engine (the training model
itself), on the same model and adapters, with one adapter and with four adapters mixed in one batch.

Each cell: N chat prompts ("What is a + b?"), one sample each, 64 new tokens at most, temperature 1,
seeded; generated tokens per second of wall time, median over the repeats, after a warm-up of each
shape. Both engines run in this one process, one configuration after the other.

    .venv/bin/python benchmarks/sampling_throughput.py [--repeats 3] [--prompts 8,32,128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def run(trainer: Trainer, names: list[str], batch: list[list[int]]) -> tuple[float, int]:
    jobs = [SampleJob(names[i % len(names)], p, 1, SamplingParams(max_tokens=NEW_TOKENS, seed=i))
            for i, p in enumerate(batch)]
    started = time.perf_counter()
    results = trainer.sample_batch(jobs)
    seconds = time.perf_counter() - started
    return seconds, sum(len(r.sequences[0].tokens) for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", default="8,32,128")
    args = parser.parse_args()
    sizes = [int(x) for x in args.prompts.split(",")]

    engines = {name: Trainer(engine=name, max_lora_rank=RANK, max_loras=4) for name in ("vllm", "pytorch")}
    names = {name: adapters(t, 4) for name, t in engines.items()}
    model = engines["vllm"].model_path.rsplit("/", 1)[-1]
    dtype = engines["vllm"].policy.dtype
    rows, speed = [], {}
    for n in sizes:
        batch = prompts(engines["vllm"].tokenizer, n)
        for mix in (1, 4):
            cell = {}
            for name, trainer in engines.items():
                run(trainer, names[name][:mix], batch)  # warm-up of this shape
                samples = [run(trainer, names[name][:mix], batch) for _ in range(args.repeats)]
                rates = [tokens / seconds for seconds, tokens in samples]
                cell[name] = statistics.median(rates)
                speed[(n, mix, name)] = cell[name]
                print(f"{n} prompts, {mix} adapter(s), {name}: {cell[name]:.0f} tok/s "
                      f"({statistics.median(s for s, _ in samples):.1f} s)", flush=True)
            rows.append([n, mix, f"{cell['vllm']:.0f}", f"{cell['pytorch']:.0f}",
                         f"{cell['vllm'] / cell['pytorch']:.1f}x"])
    for t in engines.values():
        t.close()
    headers = ["prompts", "adapters mixed", "vllm tok/s", "pytorch tok/s", "vllm / pytorch"]
    print(table(headers, rows))
    write_section("sampling_throughput", f"""
## Sampling throughput: vllm engine vs pytorch engine

Generated tokens per second (median of {args.repeats} runs after a warm-up of each shape), {model} ({dtype}),
LoRA rank {RANK} on all linear layers, one sample per prompt, at most {NEW_TOKENS} new tokens, temperature 1,
seeded. "4 adapters mixed": prompt i uses adapter i mod 4, all in one `sample_batch` call. Both engines
in one process, measured one after the other.

Machine: {machine()}.

{table(headers, rows)}

Command: `.venv/bin/python benchmarks/sampling_throughput.py --repeats {args.repeats} --prompts {args.prompts}`
""")


if __name__ == "__main__":
    main()
