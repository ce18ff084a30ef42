"""Checkpoints (save_state/load_state with optimizer state) and plain-PEFT export."""

import hashlib
import os
import random
import signal
import time

import pytest
import torch

import colo.checkpoint
from colo import AdamParams, CheckpointError, Datum, LoraConfig
from helpers import assert_same_snapshot, encode, snapshot

SEQ = "the cat sat on a mat and ran to the big red tree"


def step(trainer, adapter, datum):
    trainer.forward_backward(adapter, [datum])
    trainer.optim_step(adapter, AdamParams(learning_rate=5e-3, weight_decay=0.01))


def test_save_load_then_step_equals_never_having_saved(trainer, adapter, tmp_path):
    datum = Datum.from_sequence(encode(trainer, SEQ))
    for _ in range(3):
        step(trainer, adapter, datum)
    path = trainer.save_state(adapter, tmp_path / "ckpt.safetensors")
    step(trainer, adapter, datum)
    expected = {k: p.detach().clone() for k, p in trainer.adapters[adapter].params.items()}

    restored = trainer.load_state(path)
    try:
        assert trainer.version(restored) == 3
        step(trainer, restored, datum)
        assert trainer.version(restored) == trainer.version(adapter) == 4
        for k, p in trainer.adapters[restored].params.items():
            assert torch.equal(p, expected[k]), k
    finally:
        trainer.delete_lora(restored)


def test_load_state_over_an_existing_adapter(trainer, make_adapter, tmp_path):
    a, b = make_adapter(seed=1), make_adapter(seed=2)
    datum = Datum.from_sequence(encode(trainer, SEQ))
    step(trainer, a, datum)
    trainer.save_state(a, tmp_path / "a.ckpt")
    assert trainer.load_state(tmp_path / "a.ckpt", adapter=b) == b
    assert trainer.compute_logprobs(a, encode(trainer, SEQ)) == trainer.compute_logprobs(b, encode(trainer, SEQ))


def test_weights_only_checkpoint_starts_a_fresh_optimizer(trainer, adapter, tmp_path):
    step(trainer, adapter, Datum.from_sequence(encode(trainer, SEQ)))
    restored = trainer.load_state(trainer.save_state(adapter, tmp_path / "w.ckpt", optimizer=False))
    try:
        assert trainer.adapters[restored].optimizer_tensors() == {}
        assert trainer.compute_logprobs(restored, encode(trainer, SEQ)) == trainer.compute_logprobs(adapter, encode(trainer, SEQ))
    finally:
        trainer.delete_lora(restored)


def test_crash_mid_save_leaves_the_previous_checkpoint_loadable(trainer, adapter, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    trainer.save_state(adapter, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    step(trainer, adapter, Datum.from_sequence(encode(trainer, SEQ)))

    def dies_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # a partial file, then the process "dies"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(colo.checkpoint, "save_file", dies_half_way)
    with pytest.raises(CheckpointError, match="No space left"):
        trainer.save_state(adapter, path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temporary left behind
    monkeypatch.undo()
    restored = trainer.load_state(path)
    assert trainer.version(restored) == 0
    trainer.delete_lora(restored)


def test_corrupt_or_foreign_checkpoint_is_refused_and_adds_nothing(trainer, adapter, tmp_path):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(open(trainer.save_state(adapter, tmp_path / "good.ckpt"), "rb").read()[:200])
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(foreign))
    before = snapshot(trainer)
    for bad, message in [(truncated, "cannot read"), (foreign, "not a colo checkpoint"),
                         (tmp_path / "missing", "no checkpoint")]:
        with pytest.raises(CheckpointError, match=message):
            trainer.load_state(bad)
    assert_same_snapshot(before, snapshot(trainer))


def test_exported_adapter_loads_in_peft_with_the_same_logprobs(trainer, adapter, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokens = encode(trainer, SEQ)
    for _ in range(3):
        step(trainer, adapter, Datum.from_sequence(tokens))
    out = trainer.export_adapter(adapter, tmp_path / "exported")
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0, :-1].float()
    theirs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:]).unsqueeze(-1)).squeeze(-1)
    ours = torch.tensor(trainer.compute_logprobs(adapter, tokens)[1:])
    assert torch.allclose(theirs, ours, atol=1e-5)

    # exporting again replaces the directory whole
    step(trainer, adapter, Datum.from_sequence(tokens))
    trainer.export_adapter(adapter, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]


def killed_mid_save(target) -> list:
    """SIGKILL a forked process while it saves ``target`` over and over, until a temporary file is left."""
    ckpt = colo.checkpoint.Checkpoint(lora=LoraConfig(rank=4), seed=0, version=0, base_model="x",
                                      weights={"w": torch.ones(16 << 20)}, optimizer={})
    for _ in range(10):
        pid = os.fork()
        if pid == 0:  # the child saves until it is killed, and never returns into pytest
            try:
                while True:
                    colo.checkpoint.save_checkpoint(target, ckpt)
            finally:
                os._exit(1)
        time.sleep(0.2 + 0.3 * random.random())
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        left = list(target.parent.glob(".*.tmp-*"))
        if left:
            return left
    raise AssertionError("no save was caught midway in 10 tries")


def test_temporary_files_of_killed_saves_are_removed_by_the_next_save_and_the_next_start(trainer, adapter, tmp_path):
    from colo.service.checkpoint_store import CheckpointStore

    root = tmp_path / "checkpoints"
    target = root / "alice" / "m1" / "weights" / "a.safetensors"
    target.parent.mkdir(parents=True)
    assert killed_mid_save(target)
    trainer.save_state(adapter, target)  # the same name: its own leftovers go
    assert not list(target.parent.glob(".*.tmp-*"))
    assert killed_mid_save(target)
    store = CheckpointStore(root)  # a service starting on this directory
    assert not list(root.rglob(".*.tmp-*"))
    assert killed_mid_save(target)
    assert store.sweep(root / "alice") >= 1  # what the service does before a save and on its timer
    assert not list(root.rglob(".*.tmp-*"))
    assert colo.checkpoint.load_checkpoint(target).weights["w"].numel() == 16 << 20  # the last whole one
