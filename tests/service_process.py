"""Start ``torchrun_entry.py`` as a real process on a free loopback port, and stop it with SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    def __init__(self, env: dict[str, str], log_path: Path, ranks: int = 1) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, **env, "COLO_HOST": "127.0.0.1", "COLO_PORT": str(self.port)}
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                    "--master_port", str(free_port())]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(torchrun + [str(ROOT / "torchrun_entry.py")], cwd=ROOT, env=full_env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/api/v1/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"service not ready in {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        if not self.log.closed:
            self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM to the launcher, which passes it on, then wait; the launcher's exit code (torchrun
        itself reports the signal with 1; the service's own clean stop shows in its log)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
