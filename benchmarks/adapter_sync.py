"""How long from ``optim_step`` returning to the new adapter version being servable by vLLM.

- in-memory (colo's path): the version's tensors are copied and handed to the in-process vLLM
  worker's LoRA cache (``engine.publish``: what ``optim_step`` does after the AdamW step).
- disk, the conventional path: PEFT's ``save_pretrained`` of the adapter to a directory on the
  local disk, then vLLM loads it from there (``LLMEngine.add_lora`` with the directory as
  ``lora_path``), as trainers that sync through files or ``/v1/load_lora_adapter`` do.
- disk, colo's fallback: colo's own export of the tensors to tmpfs (``/dev/shm``), then the same
  vLLM load: the best a file path does here, used when the in-memory path is unavailable.

Both end with the version in the worker's LoRA cache, ready for the next ``generate``; both are
timed in one run, alternating, on the same engine.

    .venv/bin/python benchmarks/adapter_sync.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import machine, table, write_section  # noqa: E402
from colo import AdamParams, Datum, Trainer  # noqa: E402
from colo.peft_files import write_peft  # noqa: E402
from engines.base import AdapterUpdate, AdapterVersion  # noqa: E402

RANK = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    trainer = Trainer(engine="vllm", max_lora_rank=RANK)
    engine = trainer.engine
    if not engine.capabilities.in_memory_adapter_loading:
        raise SystemExit(f"this vLLM ({engine.llm.llm_engine.vllm_config}) has no in-memory path to measure")
    adapter = trainer.create_lora(rank=RANK, seed=0, train_attn=True, train_mlp=True)
    state = trainer.adapters[adapter]
    n_params = sum(p.numel() for p in state.params.values())
    tokens = trainer.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    peft_config = trainer.policy.peft_config(state.lora).to_dict()

    from vllm.lora.request import LoRARequest

    times: dict[str, list[float]] = {"memory": [], "disk": [], "tmpfs": []}

    def load_into_vllm(name: str, path: Path) -> None:
        lora_id = 10_000_000 + len(times["disk"]) * 2 + (name == "tmpfs")
        engine.llm.llm_engine.add_lora(LoRARequest(f"{name}-{lora_id}", lora_id, str(path)))
        engine.llm.llm_engine.remove_lora(lora_id)  # after the clock stops: keep the cache small

    with tempfile.TemporaryDirectory(prefix="colo-bench-", dir="/dev/shm") as shm, \
            tempfile.TemporaryDirectory(prefix="colo-bench-", dir=Path.home()) as disk_dir:
        for i in range(args.repeats + 2):  # the first two of each are warm-up
            trainer.forward_backward(adapter, [Datum.from_sequence(tokens)])
            trainer.optim_step(adapter, AdamParams(learning_rate=1e-4))
            tensors = {k: p.detach() for k, p in state.params.items()}
            update = AdapterUpdate(AdapterVersion(adapter, state.version), peft_config, tensors)

            started = time.perf_counter()
            engine.publish(update)
            memory = time.perf_counter() - started

            started = time.perf_counter()
            load_into_vllm("disk", write_peft(Path(disk_dir) / f"v{i}", peft_config, tensors))
            disk = time.perf_counter() - started

            started = time.perf_counter()
            load_into_vllm("tmpfs", write_peft(Path(shm) / f"v{i}", peft_config, tensors))
            tmpfs = time.perf_counter() - started

            if i >= 2:
                for key, value in (("memory", memory), ("disk", disk), ("tmpfs", tmpfs)):
                    times[key].append(value * 1e3)
    trainer.close()

    base = statistics.median(times["memory"])

    def row(name, ms):
        q = statistics.quantiles(ms, n=10)
        return [name, f"{statistics.median(ms):.2f}", f"{q[0]:.2f}", f"{q[-1]:.2f}",
                f"{statistics.median(ms) / base:.1f}x"]

    ratio = statistics.median(times["disk"]) / base
    rows = [row("in-memory (colo's path)", times["memory"]),
            row("disk: PEFT save_pretrained to local disk + vLLM load from the directory", times["disk"]),
            row("tmpfs: colo export to /dev/shm + vLLM load from the directory", times["tmpfs"])]
    headers = ["path", "median ms", "p10 ms", "p90 ms", "vs in-memory"]
    print(table(headers, rows))
    write_section("adapter_sync", f"""
## Adapter sync latency

Time from `optim_step` returning to the new version being servable (in vLLM's LoRA cache), for
{trainer.model_path.rsplit('/', 1)[-1]} ({trainer.policy.dtype}), LoRA rank {RANK} on all linear layers
({n_params / 1e6:.2f} M adapter parameters), {args.repeats} versions, both paths alternating in one run.

Machine: {machine()}.

{table(headers, rows)}

The in-memory path is **{ratio:.1f}x** faster than the disk path (ratio of medians); even with the
files on tmpfs, a file round trip costs {statistics.median(times["tmpfs"]) / base:.1f}x more. What remains of the in-memory
time is one copy of the adapter into vLLM's LoRA dtype (the trainer's parameters change in place at
the next step, so vLLM cannot keep references to them) and vLLM adding the version to its cache
(packing q/k/v and gate/up); parsing the tensor names (2 ms) is done for an adapter's first version
only, later versions reuse its layout.

Command: `.venv/bin/python benchmarks/adapter_sync.py --repeats {args.repeats}`
""")


if __name__ == "__main__":
    main()
