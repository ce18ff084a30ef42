"""Memory: colo in one process (trainer + in-process vLLM) vs a trainer process plus a separate
``vllm serve`` process for the same model (the ``vllm-http`` engine), on the same workload.

Workload, the same both ways: one LoRA adapter (rank 16), then ``--steps`` times: sample 8 prompts x
4 samples of 32 tokens, ``forward_backward`` on those samples, ``optim_step`` (which publishes the
new version). Both sides get the same vLLM settings (dtype, 1 GiB KV cache on CPU, LoRA slots).
Memory is the peak, over the run, of the summed proportional set size (PSS: shared pages split
between the processes that share them, so a two-process setup is not double-counted) of every
process involved, polled every 0.25 s; peak RSS is shown too. Memory reclaimed by each sleep is
reported where the platform can sleep (CUDA); on CPU vLLM cannot.

    .venv/bin/python benchmarks/memory.py [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import service_process  # noqa: E402
from benchmarks.report import machine, table, write_section  # noqa: E402

WORKLOAD = r"""
import json, sys
from colo import AdamParams, Datum, SamplingParams, Trainer
trainer = Trainer(engine=sys.argv[1], engine_url=sys.argv[2] or None, max_lora_rank=16, max_loras=4)
a = trainer.create_lora(rank=16, seed=0)
tok = trainer.tokenizer
prompts = [tok.apply_chat_template([{"role": "user", "content": f"What is {i} + {i + 3}?"}],
                                   add_generation_prompt=True, return_dict=False) for i in range(8)]
reclaimed = []
for step in range(int(sys.argv[3])):
    results = trainer.sample(a, prompts, 4, SamplingParams(max_tokens=32, seed=step))
    data = [Datum.from_sequence(p + s.tokens) for p, r in zip(prompts, results) for s in r.sequences]
    out = trainer.forward_backward(a, data)
    reclaimed.append(out.metrics.get("engine_sleep_reclaimed_bytes:sum"))
    trainer.optim_step(a, AdamParams(learning_rate=1e-4))
print("RESULT " + json.dumps({"reclaimed": reclaimed, "model": trainer.model_path, "dtype": str(trainer.policy.dtype)}))
trainer.close()
"""


class Peak:
    """Polls the summed PSS and RSS of some process trees until stopped."""

    def __init__(self, pids: list[int]) -> None:
        self.pids, self.pss, self.rss = pids, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            pss = rss = 0
            for pid in self.pids:
                try:
                    root = psutil.Process(pid)
                    for p in [root, *root.children(recursive=True)]:
                        info = p.memory_full_info()
                        pss, rss = pss + info.pss, rss + info.rss
                except psutil.Error:
                    continue
            self.pss, self.rss = max(self.pss, pss), max(self.rss, rss)
            self._stop.wait(0.25)

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        return self.pss / 2**30, self.rss / 2**30


def run_workload(engine: str, url: str, steps: int, others: list[int]) -> tuple[float, float, dict]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WORKLOAD, engine, url, str(steps)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = Peak([proc.pid, *others])
    out, _ = proc.communicate()
    pss, rss = peak.stop()
    if proc.returncode != 0:
        raise SystemExit(f"the {engine} workload failed ({proc.returncode})")
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    return pss, rss, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    colo_pss, colo_rss, result = run_workload("vllm", "", args.steps, [])
    print(f"colo, one process: peak PSS {colo_pss:.2f} GiB, RSS {colo_rss:.2f} GiB", flush=True)

    port = service_process.free_port()
    log = Path(tempfile.mkdtemp(prefix="colo-bench-")) / "vllm-serve.log"
    dtype = result["dtype"].removeprefix("torch.")
    server = service_process.vllm_serve(result["model"], port, log, "--enable-lora", "--max-lora-rank", "16",
                                        "--max-loras", "4", "--dtype", dtype, "--max-model-len", "2048")
    try:
        idle = Peak([server.pid])
        time.sleep(2)
        idle_pss, _ = idle.stop()
        split_pss, split_rss, _ = run_workload("vllm-http", f"http://127.0.0.1:{port}", args.steps, [server.pid])
    finally:
        service_process.stop(server)
    print(f"trainer + vllm serve: peak PSS {split_pss:.2f} GiB, RSS {split_rss:.2f} GiB "
          f"(the server alone, idle: {idle_pss:.2f} GiB)", flush=True)

    rows = [["colo: trainer + in-process vLLM (one process)", f"{colo_pss:.2f}", f"{colo_rss:.2f}", "1.00x"],
            ["trainer process + `vllm serve` process (vllm-http engine)", f"{split_pss:.2f}", f"{split_rss:.2f}",
             f"{split_pss / colo_pss:.2f}x"]]
    headers = ["setup", "peak PSS GiB", "peak RSS GiB", "PSS vs colo"]
    reclaimed = [r for r in result["reclaimed"] if r is not None]
    sleep_line = (f"Memory reclaimed per sleep (`engine_sleep_reclaimed_bytes:sum`): "
                  f"{', '.join(f'{r / 2**30:.2f} GiB' for r in reclaimed)}." if reclaimed else
                  "Memory reclaimed per sleep: none here; vLLM cannot sleep on CPU (it needs CUDA), so "
                  "`engine_sleep_reclaimed_bytes:sum` is absent. Not yet measured on a GPU.")
    print(table(headers, rows))
    write_section("memory", f"""
## Memory: one process vs trainer + server

{result['model'].rsplit('/', 1)[-1]} ({dtype}), LoRA rank 16, {args.steps} steps of: sample 8 prompts x 4 samples
(32 tokens), `forward_backward` on them, `optim_step`. vLLM KV cache 1 GiB (CPU), 4 LoRA slots, both ways.
Peak over the run of the summed PSS (and RSS) of every process involved, polled every 0.25 s.

Machine: {machine()}.

{table(headers, rows)}

The separate server, idle after start-up, held {idle_pss:.2f} GiB PSS on its own. {sleep_line}

Command: `.venv/bin/python benchmarks/memory.py --steps {args.steps}`
""")


if __name__ == "__main__":
    main()
