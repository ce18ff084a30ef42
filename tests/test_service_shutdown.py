"""SIGTERM while clients have work queued: the service finishes or answers it and stops cleanly."""

from __future__ import annotations

import time

import numpy as np
import tinker
from service_process import ServiceProcess
from tinker import types

from colo.checkpoint import load_checkpoint


def test_sigterm_with_queued_work_stops_cleanly_and_leaves_no_half_written_checkpoint(tiny_model_dir, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    proc = ServiceProcess({"COLO_MODEL": str(tiny_model_dir), "COLO_ENGINE": "pytorch", "COLO_DTYPE": "float32",
                           "COLO_DEVICE": "cpu", "COLO_CHECKPOINT_DIR": str(checkpoints)}, tmp_path / "service.log")
    try:
        proc.wait_ready()
        sc = tinker.ServiceClient(base_url=proc.url, api_key="tml-open")
        tc = sc.create_lora_training_client(base_model=str(tiny_model_dir), rank=8, train_unembed=False).result()
        tokens = list(range(10, 60))
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": np.array(tokens[1:])})
        tc.save_state("before").result()
        for i in range(6):  # queued, not awaited
            tc.forward_backward([datum], "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-3))
            tc.save_state(f"step-{i}")
        time.sleep(1.0)
    finally:
        started = time.monotonic()
        proc.stop(timeout=120)
        stopped_in = time.monotonic() - started
    log = proc.tail(300)
    assert "colo: stopped cleanly" in log, log
    assert stopped_in < 60, stopped_in
    files = [p for p in checkpoints.rglob("*") if p.is_file()]
    assert not [p for p in files if ".tmp-" in p.name], files  # no half-written file
    saved = [p for p in files if p.suffix == ".safetensors"]
    assert any(p.name == "before.safetensors" for p in saved)
    for p in saved:  # every checkpoint on disk is whole
        assert load_checkpoint(p).weights
