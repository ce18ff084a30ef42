"""``colo doctor``: a short self-check of this machine's install, with the configured model and engine.

It prints what it finds as it goes: the device, the versions that matter, the engine and whether its
fast paths are on (and why not), how long publishing a new adapter version takes, sleep/wake cycles
at the configured level (bytes reclaimed each cycle, memory not given back, and greedy samples after
waking equal to those before sleeping), and the gap between the sampler's logprobs and the trainer's.
Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import importlib.metadata
import platform
import statistics
import time

import torch

from colo.config import Config
from colo.types import AdamParams, Datum, SamplingParams

TEXT = "colo checks that what it trains is what it samples."
# the logprob gap allowed: float32 agrees to ~1e-5; bf16/fp16 keep 8/11 bits of mantissa
GAP_LIMITS = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.05}
CYCLES = 3
PUBLISHES = 5


def _version(package: str) -> str:
    for name in (package, f"{package}-cpu"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def versions() -> str:
    return ", ".join(f"{p} {_version(p)}" for p in ("torch", "transformers", "peft", "vllm"))


def describe_device() -> str:
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return f"{torch.cuda.get_device_name()} ({total / 2**30:.0f} GiB, {free / 2**30:.1f} GiB free)"
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if platform.system() == "Linux" else platform.processor()
    return f"CPU: {model}, {torch.get_num_threads()} threads"


def sampler_gaps(trainer, adapter: str, prompt: list[int]) -> list[float]:
    """|sampler - trainer| logprob of every token of 4 seeded samples of ``prompt`` (16 tokens each)."""
    results = trainer.sample(adapter, [prompt], 4, SamplingParams(max_tokens=16, seed=0))[0]
    gaps = []
    for seq in results.sequences:
        ours = trainer.compute_logprobs(adapter, prompt + seq.tokens)[len(prompt):]
        gaps += [abs(a - b) for a, b in zip(ours, seq.logprobs)]
    return gaps


def run(config: Config) -> int:
    from colo.trainer import Trainer

    problems: list[str] = []

    def check(ok: bool, line: str) -> None:
        print(("  ok    " if ok else "  FAIL  ") + line, flush=True)
        if not ok:
            problems.append(line)

    print("colo doctor", flush=True)
    print(f"  device: {describe_device()}")
    print(f"  versions: {versions()}")
    started = time.perf_counter()
    trainer = Trainer(config)
    print(f"  model: {trainer.model_path} ({trainer.policy.dtype}), ready in {time.perf_counter() - started:.1f} s")
    engine = trainer.engine
    print(f"  engine: {engine.name}: {engine.capabilities}")
    for line in engine.describe():
        print(f"  {line}")
    try:
        adapter = trainer.create_lora(rank=min(16, config.max_lora_rank), seed=0)
        tokens = trainer.tokenizer.encode(TEXT)
        trainer.forward_backward(adapter, [Datum.from_sequence(tokens)])
        trainer.optim_step(adapter, AdamParams(learning_rate=1e-3))
        # later steps at learning rate 0 publish a new version each with the same weights, so the
        # logprob check below sees an adapter one step away from its start, whatever PUBLISHES is
        times = []
        for _ in range(PUBLISHES):
            trainer.forward_backward(adapter, [Datum.from_sequence(tokens)])
            times.append(trainer.optim_step(adapter, AdamParams(learning_rate=0.0)).metrics["publish_seconds:sum"])
        print(f"  publish a new adapter version: {statistics.median(times) * 1000:.1f} ms "
              f"(median of {PUBLISHES} optimizer steps)")

        prompt = tokens[:4]
        greedy = SamplingParams(max_tokens=12, temperature=0)
        before = trainer.sample(adapter, [prompt], 1, greedy)[0].sequences[0].tokens
        if engine.capabilities.sleep:
            creep = []
            for cycle in range(CYCLES):
                reclaimed = trainer.sleep.before_training()
                trainer.sleep.before_sampling()
                free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
                creep.append(free)
                after = trainer.sample(adapter, [prompt], 1, greedy)[0].sequences[0].tokens
                print(f"  sleep cycle {cycle + 1} (level {config.sleep_level}): "
                      f"{(reclaimed or 0) / 2**20:.0f} MiB reclaimed")
                check(after == before, f"greedy sample after wake {cycle + 1} equals the one before sleeping")
            if None not in creep:
                lost = creep[0] - creep[-1]
                check(lost < 64 << 20, f"memory not given back over {CYCLES} cycles: {lost / 2**20:.0f} MiB")
        else:
            print("  sleep: not available with this engine on this device (training and sampling share memory)")

        gaps = sampler_gaps(trainer, adapter, prompt)
        limit = GAP_LIMITS.get(trainer.policy.dtype, 0.1)
        check(statistics.mean(gaps) < limit, f"sampler vs trainer logprobs ({trainer.policy.dtype}): mean gap "
                                             f"{statistics.mean(gaps):.2e}, max {max(gaps):.2e} (limit {limit})")
    finally:
        trainer.close()
    print("colo doctor: " + ("all checks passed" if not problems else f"{len(problems)} check(s) failed"))
    return 0 if not problems else 1
