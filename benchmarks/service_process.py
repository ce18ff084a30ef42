"""Start a colo service or a ``vllm serve`` as a child process for a benchmark, and stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv: list[str], env: dict[str, str], ready_path: str, port: int, log: Path,
          timeout: float = 600) -> subprocess.Popen:
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{argv[:4]} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop(proc)
    raise SystemExit(f"{argv[:4]} not ready in {timeout} s; see {log}")


def colo_service(port: int, log: Path, **env: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port",
            str(free_port()), str(ROOT / "torchrun_entry.py")]
    return start(argv, {"COLO_HOST": "127.0.0.1", "COLO_PORT": str(port), **env}, "/api/v1/healthz", port, log)


def vllm_serve(model: str, port: int, log: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
            "--port", str(port), *extra]
    return start(argv, {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1"}, "/v1/models", port,
                 log)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
