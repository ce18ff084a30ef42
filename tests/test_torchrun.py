"""The colocated engine under ``torchrun --nproc_per_node=1``, as the product is started."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent / "scripts" / "colocated_run.py"


def test_training_and_sampling_under_torchrun(tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", str(SCRIPT), str(tiny_model_dir)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "backend=external_launcher version=40 recited=True" in proc.stdout
