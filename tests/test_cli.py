"""The ``colo`` command."""

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
