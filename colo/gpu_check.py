"""``colo doctor --gpu``: the whole colocated path proven on this machine, as a table and a JSON file.

What it shows, on the configured model and engine:
1. start-up: the share of GPU memory colo's check predicted vLLM would take, against what it took;
   torch's thread count before and after the engine started (vLLM's CUDA worker sets 1 for the process);
2. fresh weights: ``cycles`` of train -> publish -> sample, each sample checked to come from the newest
   version by its weights, not its label: the sampler's prompt logprobs of a probe must be closer to the
   trainer's logprobs after the step than before it (and the step must move them measurably);
3. sleep and wake at levels 1 and 2: bytes reclaimed by colo's count, by ``torch.cuda.mem_get_info`` and by
   NVML (where ``pynvml`` is installed), the time of each sleep and wake, and a sample right after the wake
   that is fresh by the same test;
4. the sampler's logprobs against the trainer's on the same tokens (mean and largest gap);
5. the engine shut down and started again in this process, sampling what it sampled before;
6. the thread count at the end.
On a machine without CUDA it runs the same, and says which rows need CUDA.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from colo.config import Config
from colo.doctor import GAP_LIMITS, describe_device, sampler_gaps, versions
from colo.types import AdamParams, Datum, SampleJob, SamplingParams

PROBE = "colo checks that what it trains is what it samples, step after step."
# sign descent (Adam without moments): every weight moves by the learning rate at every step, the last as much as
# the first, so each step moves the probe's logprobs well past the sampler's rounding (bf16: ~5e-2)
STEP = AdamParams(learning_rate=1e-2, beta1=0.0, beta2=0.0)
NEEDS_CUDA = "needs CUDA (vLLM sleeps and takes a share of GPU memory only there)"


@dataclass
class Row:
    check: str
    status: str  # "ok", "FAIL" or "skipped"
    figures: str
    data: dict = field(default_factory=dict)


def _mean_gap(a: list[float | None], b: list[float | None]) -> float:
    return statistics.mean(abs(x - y) for x, y in zip(a, b) if x is not None and y is not None)


class Probe:
    """Whether a sample came from the newest version, judged by weights: the sampler's logprobs of the probe
    tokens must be nearer the trainer's after the step than before it."""

    def __init__(self, trainer, adapter: str) -> None:
        self.trainer, self.adapter = trainer, adapter
        self.tokens = trainer.tokenizer.encode(PROBE)
        self.rng = random.Random(0)

    def before(self) -> list[float | None]:
        return self.trainer.compute_logprobs(self.adapter, self.tokens)

    def step(self) -> int:
        """One optimizer step towards random tokens (so every step moves the weights as much as the first)."""
        vocab = self.trainer.policy.vocab_size
        tokens = [self.rng.randrange(vocab) for _ in range(len(self.tokens))]
        self.trainer.forward_backward(self.adapter, [Datum.from_sequence(tokens)])
        return self.trainer.optim_step(self.adapter, STEP).version

    def judge(self, old: list[float | None], version: int) -> dict:
        new = self.before()
        result = self.trainer.sample_batch([SampleJob(self.adapter, self.tokens, 1, SamplingParams(max_tokens=1),
                                                      prompt_logprobs=True)])[0]
        to_new, to_old = _mean_gap(result.prompt_logprobs, new), _mean_gap(result.prompt_logprobs, old)
        moved = _mean_gap(new, old)
        return {"version": result.adapter_version, "expected_version": version, "gap_to_newest": to_new,
                "gap_to_previous": to_old, "step_moved": moved,
                "fresh": result.adapter_version == version and to_new < to_old}


def fresh_weights(trainer, adapter: str, cycles: int) -> Row:
    probe = Probe(trainer, adapter)
    judged = []
    for _ in range(cycles):
        old = probe.before()
        judged.append(probe.judge(old, probe.step()))
    stale = [j for j in judged if not j["fresh"]]
    margin = min(j["gap_to_previous"] / max(j["gap_to_newest"], 1e-12) for j in judged)
    figures = (f"{len(stale)} stale of {cycles}; sampler to newest {statistics.median(j['gap_to_newest'] for j in judged):.1e}"
               f" vs to previous {statistics.median(j['gap_to_previous'] for j in judged):.1e} (medians), "
               f"smallest ratio {margin:.0f}x")
    return Row(f"train -> publish -> sample, {cycles} cycles", "ok" if not stale else "FAIL", figures,
               {"cycles": judged, "stale": len(stale)})


def _nvml_used() -> int | None:
    """Memory in use on this GPU by NVML's count (every process), where pynvml is installed."""
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


def _free() -> int | None:
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None


def sleep_and_wake(trainer, adapter: str, level: int) -> Row:
    name = f"sleep and wake, level {level}"
    if not trainer.engine.capabilities.sleep:
        return Row(name, "skipped", NEEDS_CUDA)
    control, probe = trainer.sleep, Probe(trainer, adapter)
    control.before_sampling()
    configured, control.level = control.level, level
    old = probe.before()
    free_before, nvml_before = _free(), _nvml_used()
    started = time.perf_counter()
    reclaimed = control.before_training()
    slept = time.perf_counter() - started
    free_asleep, nvml_asleep = _free(), _nvml_used()
    version = probe.step()  # trained and published while the engine sleeps, as every step runs
    started = time.perf_counter()
    control.before_sampling()
    woke = time.perf_counter() - started
    after = probe.judge(old, version)  # the first sample after the wake
    control.level = configured
    data = {"reclaimed_colo": reclaimed, "reclaimed_mem_get_info": free_asleep - free_before,
            "reclaimed_nvml": None if nvml_before is None or nvml_asleep is None else nvml_before - nvml_asleep,
            "sleep_seconds": slept, "wake_seconds": woke, "sample_after_wake": after}
    nvml = "n/a (pip install nvidia-ml-py)" if data["reclaimed_nvml"] is None else f"{data['reclaimed_nvml'] / 2**30:.2f}"
    figures = (f"reclaimed GiB: colo {(reclaimed or 0) / 2**30:.2f}, mem_get_info {data['reclaimed_mem_get_info'] / 2**30:.2f}, "
               f"NVML {nvml}; sleep {slept:.2f} s, wake {woke:.2f} s; sample after wake "
               f"{'fresh' if after['fresh'] else 'STALE'} (v{after['version']})")
    ok = after["fresh"] and (reclaimed or 0) > 0
    return Row(name, "ok" if ok else "FAIL", figures, data)


def logprob_gap(trainer, adapter: str) -> Row:
    gaps = sampler_gaps(trainer, adapter, trainer.tokenizer.encode(PROBE)[:6])
    limit = GAP_LIMITS.get(trainer.policy.dtype, 0.1)
    mean = statistics.mean(gaps)
    return Row(f"sampler vs trainer logprobs ({str(trainer.policy.dtype).removeprefix('torch.')})",
               "ok" if mean < limit else "FAIL", f"mean gap {mean:.2e}, max {max(gaps):.2e} (limit on the mean {limit})",
               {"mean": mean, "max": max(gaps), "tokens": len(gaps), "limit": limit})


def restart(trainer, adapter: str) -> Row:
    tokens = trainer.tokenizer.encode(PROBE)[:6]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    before = trainer.sample(adapter, [tokens], 1, greedy)[0].sequences[0].tokens
    free_before = _free()
    started = time.perf_counter()
    trainer.set_engine(trainer.engine.name)
    seconds = time.perf_counter() - started
    after = trainer.sample(adapter, [tokens], 1, greedy)[0]
    same = after.sequences[0].tokens == before and after.adapter_version == trainer.version(adapter)
    lost = None if free_before is None else free_before - _free()
    figures = f"restarted in {seconds:.1f} s; greedy sample {'the same' if same else 'DIFFERENT'}"
    if lost is not None:
        figures += f"; {lost / 2**20:.0f} MiB less free than before"
    ok = same and (lost is None or lost < 256 << 20)
    return Row("engine shut down and started again in this process", "ok" if ok else "FAIL", figures,
               {"seconds": seconds, "same_sample": same, "free_bytes_lost": lost})


def run(config: Config, cycles: int = 50, json_path: str | Path = "colo-gpu-check.json") -> int:
    from colo.trainer import Trainer

    print("colo doctor --gpu", flush=True)
    print(f"  device: {describe_device()}")
    print(f"  versions: {versions()}")
    threads_before = torch.get_num_threads()
    started = time.perf_counter()
    trainer = Trainer(config)
    engine = trainer.engine
    print(f"  model: {trainer.model_path} ({trainer.policy.dtype}), engine {engine.name}, ready in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        print(f"  {row.status:<8}{row.check}: {row.figures}", flush=True)

    try:
        # an engine-specific figure, read only here: what vLLM's share check predicted and what vLLM took
        memory = getattr(engine, "memory_at_start", None)
        if memory is None:
            add(Row("GPU memory at start-up", "skipped", NEEDS_CUDA))
        else:
            predicted, took = memory
            add(Row("GPU memory at start-up", "ok" if took <= predicted + (512 << 20) else "FAIL",
                    f"share {config.gpu_memory_utilization}: predicted {predicted / 2**30:.2f} GiB, vLLM took "
                    f"{took / 2**30:.2f} GiB", {"predicted": predicted, "took": took}))
        threads_started = torch.get_num_threads()
        add(Row("torch threads kept at start-up", "ok" if threads_started == threads_before else "FAIL",
                f"{threads_before} before the engine, {threads_started} after", {"before": threads_before,
                                                                                  "after": threads_started}))
        adapter = trainer.create_lora(rank=min(16, config.max_lora_rank), seed=0)
        add(fresh_weights(trainer, adapter, cycles))
        for level in (1, 2):
            add(sleep_and_wake(trainer, adapter, level))
        # the gap on an adapter one ordinary step from its start: the probe's adapter has taken many large
        # steps towards random tokens, and a sharper distribution shows a larger bf16 gap
        plain = trainer.create_lora(rank=min(16, config.max_lora_rank), seed=1)
        trainer.forward_backward(plain, [Datum.from_sequence(trainer.tokenizer.encode(PROBE))])
        trainer.optim_step(plain, AdamParams(learning_rate=1e-3))
        add(logprob_gap(trainer, plain))
        add(restart(trainer, adapter))
        threads_end = torch.get_num_threads()
        add(Row("torch threads at the end", "ok" if threads_end == threads_before else "FAIL",
                f"{threads_end} (started with {threads_before})", {"end": threads_end}))
    finally:
        trainer.close()
    failed = [r for r in rows if r.status == "FAIL"]
    Path(json_path).write_text(json.dumps({
        "device": describe_device(), "versions": versions(), "model": trainer.model_path,
        "dtype": str(trainer.policy.dtype), "engine": engine.name, "cycles": cycles,
        "settings": {"gpu_memory_utilization": config.gpu_memory_utilization, "sleep_level": config.sleep_level,
                     "max_loras": config.max_loras, "max_lora_rank": config.max_lora_rank},
        "checks": [asdict(r) for r in rows]}, indent=1, default=float))
    print("\n| check | status | figures |\n|---|---|---|")
    for r in rows:
        print(f"| {r.check} | {r.status} | {r.figures} |")
    print(f"\n  wrote {json_path}")
    print("colo doctor --gpu: " + ("all checks passed" if not failed else f"{len(failed)} check(s) failed")
          + (f" ({sum(r.status == 'skipped' for r in rows)} skipped)" if any(r.status == "skipped" for r in rows) else ""))
    return 0 if not failed else 1
