"""Several ranks under ``torchrun --nproc_per_node=2`` (gloo, CPU): data-parallel training and split sampling.

The reference is the same script run as one plain process on the same global batch.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "scripts"


def _run(model_dir, out: Path, ranks: int | None, *extra: str, script: str = "data_parallel.py") -> subprocess.CompletedProcess:
    out.mkdir()
    launcher = [sys.executable] if ranks is None else [sys.executable, "-m", "torch.distributed.run",
                                                       f"--nproc_per_node={ranks}", "--standalone"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    return subprocess.run([*launcher, str(SCRIPTS / script), str(model_dir), str(out), *extra], capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("data-parallel")
    results = {}
    for name, ranks in (("one", None), ("two", 2)):
        proc = _run(tiny_model_dir, root / name, ranks)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results[name] = root / name
    return results


def _load(folder: Path, rank: int):
    return json.loads((folder / f"rank-{rank}.json").read_text()), torch.load(folder / f"rank-{rank}.pt")


def test_adapters_are_bitwise_equal_across_ranks_and_equal_to_one_process(runs):
    (two0, w0), (two1, w1), (one, w) = _load(runs["two"], 0), _load(runs["two"], 1), _load(runs["one"], 0)
    assert two0["world"] == 2 and one["world"] == 1
    assert w0.keys() == w1.keys() == w.keys()
    for k in w:
        assert torch.equal(w0[k], w1[k]), k
        torch.testing.assert_close(w0[k], w[k], atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(w[k], torch.zeros_like(w[k])) for k in w if "lora_B" in k)  # it did train
    # loss metrics are the global sums, and every datum's logprobs come back, in order
    assert two0["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two0["losses"] == two1["losses"]
    assert two0["logprob_lengths"] == one["logprob_lengths"]
    assert two0["version"] == two1["version"] == one["version"] == 3
    assert two0["logprob_gap"] < 1e-4 and one["logprob_gap"] < 1e-4
    # each group of samples of one prompt stays on one rank: the ranks together compute what one process does
    assert two0["tokens"] == two1["tokens"] == one["tokens"]
    assert one["tokens"]["computed"] < one["tokens"]["unshared"]


def test_split_sampling_comes_back_in_order_with_the_right_versions(runs):
    (two0, _), (two1, _), (one, _) = _load(runs["two"], 0), _load(runs["two"], 1), _load(runs["one"], 0)
    assert two0["samples"] == two1["samples"]
    for i, sample in enumerate(two0["samples"]):
        assert (sample["adapter"] is None) == (i % 3 == 0)
        assert sample["version"] == (None if i % 3 == 0 else 3)
    # seeded draws depend on the seed and sample number only: the same tokens as one process,
    # which sampled every request itself (float32 weights equal within 1e-5)
    assert [s["tokens"] for s in two0["samples"]] == [s["tokens"] for s in one["samples"]]


def test_one_vllm_engine_tensor_parallel_across_the_two_ranks(tiny_model_dir, tmp_path):
    """COLO_ENGINE=vllm with COLO_TENSOR_PARALLEL_SIZE=2 under 2 ranks: one engine sharded over both
    (external_launcher), driven by every rank with the same calls; training stays data parallel; then
    the engine is switched for another in the same processes."""
    proc = _run(tiny_model_dir, tmp_path / "tp", 2, "--engine", "vllm", "--switch-engine", "pytorch")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (r0, w0), (r1, w1) = _load(tmp_path / "tp", 0), _load(tmp_path / "tp", 1)
    # then the pytorch engine in both processes: vLLM's shutdown left torchrun's process group alone (its own
    # teardown destroys the default group), so the ranks still sum gradients over it, with colo's timeout,
    # and the new engine samples the newest version
    assert r0["switched"] == r1["switched"] == {"same_group": True, "engine": "pytorch", "versions": [4]}
    assert r0["engine"] == r1["engine"] == "vllm"
    assert r0["samples"] == r1["samples"]
    assert [s["version"] for s in r0["samples"]] == [None if i % 3 == 0 else 3 for i in range(len(r0["samples"]))]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert r0["logprob_gap"] < 1e-3 and r1["logprob_gap"] < 1e-3  # float32, the newest version on both shards


def test_the_checkpoint_is_written_once_by_rank_zero(runs):
    (two0, _), (two1, _) = _load(runs["two"], 0), _load(runs["two"], 1)
    assert two0["saved"] == two1["saved"] == str(runs["two"] / "checkpoint.safetensors")
    assert [p.name for p in runs["two"].iterdir() if "checkpoint" in p.name] == ["checkpoint.safetensors"]


def test_a_killed_rank_ends_the_job_on_every_rank(tiny_model_dir, tmp_path):
    started = time.monotonic()
    proc = _run(tiny_model_dir, tmp_path / "die", 2, "--die-after-step", "1")
    assert proc.returncode != 0
    assert time.monotonic() - started < 300
    assert "rank-0.json" not in [p.name for p in (tmp_path / "die").iterdir()]  # rank 0 did not carry on alone
    assert "Signals.SIGKILL" in proc.stderr or "SIGKILL" in proc.stderr, proc.stderr[-3000:]


def test_a_hung_rank_ends_the_job_after_the_collective_timeout(tiny_model_dir, tmp_path):
    started = time.monotonic()
    proc = _run(tiny_model_dir, tmp_path / "hang", 2, "--hang-after-step", "1", "--timeout", "5")
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert elapsed < 120, elapsed  # not the hour rank 1 sleeps
    # rank 0 gave up on its own: the loss sum of its next step timed out, and torchrun then ended rank 1
    assert "RanksError: rank 0 of 2: summing the loss and token counts failed, another rank died or hangs" in proc.stderr, \
        proc.stderr[-3000:]
    assert "COLO_COLLECTIVE_TIMEOUT_SECONDS=5 s" in proc.stderr


def serve_overfit_and_recite(tiny_model_dir, tmp_path, env: dict[str, str]) -> str:
    """The service on 2 ranks (rank 0 serves; rank 1 follows every Trainer call, colo/service/lockstep.py),
    with ``env`` on top of the test's settings: the SDK (its defaults: train_unembed=True) overfits a sentence,
    saves for sampling and recites it. The service's log."""
    import tinker
    from service_process import ServiceProcess
    from test_service import datum, greedy, overfit
    from transformers import AutoTokenizer

    proc = ServiceProcess({"COLO_MODEL": str(tiny_model_dir), "COLO_DTYPE": "float32", "COLO_DEVICE": "cpu",
                           "COLO_MAX_LORA_RANK": "16", "COLO_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
                           "OMP_NUM_THREADS": "1", **env}, tmp_path / "service.log", ranks=2)
    try:
        proc.wait_ready()
        seq = AutoTokenizer.from_pretrained(str(tiny_model_dir)).encode("the quick brown fox jumps over the lazy dog")
        tc = tinker.ServiceClient(base_url=proc.url, api_key="tml-open").create_lora_training_client(
            base_model=str(tiny_model_dir), rank=8).result()
        first = tc.forward([datum(seq)], "cross_entropy").result().metrics["loss:sum"]
        last = overfit(tc, seq, steps=60)  # the output-layer LoRA needs more steps than test_service's 40
        assert last < 0.7 * first, (first, last)
        sampler = tc.create_sampling_client(tc.save_weights_for_sampler("recite").result().path).result()
        assert greedy(sampler, seq[:3], len(seq) - 3) == seq[3:]
    finally:
        proc.stop()
    log = proc.tail(400)
    assert "rank 0 of 2" in log and "rank 1 of 2" in log, log
    assert "colo: stopped cleanly" in log, log
    return log


def test_the_service_under_two_ranks_overfits_and_recites_through_the_sdk(tiny_model_dir, tmp_path):
    log = serve_overfit_and_recite(tiny_model_dir, tmp_path, {})
    assert "engine pytorch" in log, log
