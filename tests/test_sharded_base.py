"""COLO_SHARD_BASE: the frozen base sharded over ``torchrun --nproc_per_node=2`` ranks (gloo, CPU) with FSDP2.

The reference is the same script as one plain process, the base whole. Each loss trains a fresh adapter 3
steps on data spanning several micro-batches of 48 tokens, so the ranks run different numbers of them
(the shorter ones pad with empty passes).
"""

import json

import pytest
import torch
from test_distributed import _run, serve_overfit_and_recite

from colo.losses import LOSSES


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    out = {}
    two = _run(tiny_model_dir, root / "two", 2, script="sharded.py")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    # one process, loading the checkpoint the two ranks wrote
    one = _run(tiny_model_dir, root / "one", None, "--load", str(root / "two" / "checkpoint.safetensors"),
               script="sharded.py")
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    for name in ("one", "two"):
        out[name] = [(json.loads((root / name / f"rank-{r}.json").read_text()),
                      torch.load(root / name / f"rank-{r}.pt")) for r in range(1 if name == "one" else 2)]
    return out


@pytest.mark.parametrize("loss_fn", list(LOSSES))
def test_every_loss_trains_the_same_adapter_as_one_process(runs, loss_fn):
    (one, w), = runs["one"]
    (r0, w0), (r1, w1) = runs["two"]
    assert r0["sharded"] and r1["sharded"] and not one["sharded"]
    a, b, ref = w0["weights"][loss_fn], w1["weights"][loss_fn], w["weights"][loss_fn]
    assert a.keys() == ref.keys() and any("lm_head" in k for k in a)  # the output layer's LoRA too
    for k in ref:
        assert torch.equal(a[k], b[k]), k
        torch.testing.assert_close(a[k], ref[k], atol=1e-5, rtol=1e-5)
    assert any(ref[k].abs().max() > 0 for k in ref if "lora_B" in k)  # it did train
    assert r0["losses"][loss_fn] == pytest.approx(one["losses"][loss_fn], rel=1e-5, abs=1e-4)


def test_each_rank_holds_about_half_the_base(runs):
    (one, _), = runs["one"]
    (r0, _), (r1, _) = runs["two"]
    for r in (r0, r1):
        share = r["base_bytes"] / one["base_bytes"]
        assert 0.45 < share < 0.56, share  # the final norms stay whole on every rank


def test_sampling_through_vllm_over_the_ranks_agrees_with_the_sharded_trainer(runs):
    (r0, _), (r1, _) = runs["two"]
    assert r0["gap"] < 1e-4 and r1["gap"] < 1e-4


def test_the_checkpoint_is_written_once_and_loads_on_one_rank_and_on_two(runs):
    (one, w), = runs["one"]
    (r0, w0), (r1, _) = runs["two"]
    assert r0["saved"] == r1["saved"] and r0["roundtrip"] and r1["roundtrip"]
    # the two ranks' checkpoint, loaded by one process, holds the two ranks' adapter
    for k, v in w["loaded"].items():
        assert torch.equal(v, w0["weights"]["cross_entropy"][k]), k


def test_the_peft_export_is_written_once_with_the_trained_weights(runs):
    from safetensors.torch import load_file

    (r0, w0), (r1, _) = runs["two"]
    assert r0["exported"] == r1["exported"]
    files = load_file(f"{r0['exported']}/adapter_model.safetensors")
    trained = w0["weights"]["cross_entropy"]
    assert files.keys() == trained.keys()
    assert all(torch.equal(files[k], trained[k]) for k in trained)


def test_the_pytorch_engine_is_refused_with_a_sharded_base(tiny_model_dir, tmp_path):
    proc = _run(tiny_model_dir, tmp_path / "refused", 2, "--engine", "pytorch", script="sharded.py")
    assert proc.returncode != 0
    assert ("COLO_ENGINE='pytorch' with COLO_SHARD_BASE=true: the pytorch engine samples from the training model, "
            "whose base no rank holds whole") in proc.stderr, proc.stderr[-3000:]


def test_the_service_serves_the_sdk_on_a_sharded_base(tiny_model_dir, tmp_path):
    """torchrun --nproc_per_node=2 torchrun_entry.py with COLO_SHARD_BASE=true and the vllm engine tensor parallel
    over both ranks: the SDK trains and recites."""
    from service_process import free_port

    log = serve_overfit_and_recite(tiny_model_dir, tmp_path, {
        "COLO_ENGINE": "vllm", "COLO_TENSOR_PARALLEL_SIZE": "2", "COLO_SHARD_BASE": "true",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        # vLLM's ranks open ports of their own: from here, not a just-freed one the service was given
        "VLLM_PORT": str(free_port() + 1000)})
    assert "base model sharded over 2 ranks" in log and "engine vllm" in log, log
