"""The ``colo`` command."""

import json
import os
import re
import subprocess
import sys

from colo.cli import main


def test_allocator_prints_a_mimalloc_that_a_process_can_preload(capsys):
    assert main(["allocator"]) == 0
    path = capsys.readouterr().out.strip()
    proc = subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"],
                          env={"LD_PRELOAD": path}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert path in proc.stdout  # the library is mapped into the new process


def test_config_prints_every_setting(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "COLO_MICROBATCH_TOKENS=4096" in out and "COLO_GRADIENT_CHECKPOINTING=True" in out


def test_the_preloaded_allocator_is_told_apart_from_glibc(capsys):
    assert main(["allocator"]) == 0
    path = capsys.readouterr().out.strip()
    code = "from colo import allocator; print(allocator.preloaded())"
    seen = [subprocess.run([sys.executable, "-c", code], env={"LD_PRELOAD": preload}, capture_output=True,
                           text=True).stdout.strip() for preload in (path, "")]
    assert seen == ["mimalloc", "glibc malloc"]


def test_colo_doctor_checks_the_install_and_says_all_passed(tiny_model_dir):
    env = {**os.environ, "COLO_MODEL": str(tiny_model_dir), "COLO_DTYPE": "float32", "COLO_ENGINE": "vllm",
           "COLO_MAX_LORA_RANK": "16"}
    proc = subprocess.run([sys.executable, "-m", "colo.cli", "doctor"], capture_output=True, text=True, env=env,
                          timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-3000:]
    assert re.search(r"versions: torch \S+, transformers \S+, peft \S+, vllm 0\.32", out), out
    assert "in-memory LoRA registration: on" in out
    assert re.search(r"publish a new adapter version: [\d.]+ ms", out)
    assert "sleep: not available" in out  # vLLM cannot sleep on CPU
    assert re.search(r"ok +sampler vs trainer logprobs \(torch.float32\): mean gap [\d.e+-]+", out), out
    assert out.rstrip().endswith("colo doctor: all checks passed")


def test_colo_doctor_gpu_proves_the_path_on_cpu_and_says_what_needs_cuda(tiny_model_dir, tmp_path):
    env = {**os.environ, "COLO_MODEL": str(tiny_model_dir), "COLO_DTYPE": "float32", "COLO_ENGINE": "vllm",
           "COLO_MAX_LORA_RANK": "16"}
    report = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "colo.cli", "doctor", "--gpu", "--cycles", "4", "--json",
                           str(report)], capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-3000:]
    assert out.rstrip().endswith("colo doctor --gpu: all checks passed (3 skipped)")
    checks = {c["check"]: c for c in json.loads(report.read_text())["checks"]}
    assert [c["status"] for c in checks.values()] == ["skipped", "ok", "ok", "skipped", "skipped", "ok", "ok", "ok"]
    for name in ("GPU memory at start-up", "sleep and wake, level 1", "sleep and wake, level 2"):
        assert checks[name]["figures"].startswith("needs CUDA")
    cycles = checks["train -> publish -> sample, 4 cycles"]["data"]["cycles"]
    assert [c["version"] for c in cycles] == [1, 2, 3, 4] and all(c["fresh"] for c in cycles)
    # float32: the sampler's prompt logprobs equal the newest version's within rounding, far from the previous
    assert all(c["gap_to_newest"] < 1e-4 < 1e-2 < c["gap_to_previous"] for c in cycles)
    assert checks["sampler vs trainer logprobs (float32)"]["data"]["mean"] < 1e-4
    assert checks["engine shut down and started again in this process"]["data"]["same_sample"]
    assert checks["torch threads at the end"]["data"]["end"] == checks["torch threads kept at start-up"]["data"]["before"]
    assert "| train -> publish -> sample, 4 cycles | ok | 0 stale of 4;" in out  # the table to paste
