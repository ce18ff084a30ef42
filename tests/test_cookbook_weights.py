"""Trained weights out through tinker-cookbook's own tools, unmodified, on the default model.

``tinker_cookbook.weights.download`` fetches an export (``save_weights_external``) and a training
checkpoint (``save_state``: the cookbook loads it into a new run and exports it encrypted to a key it
makes for the download); ``build_lora_adapter`` turns the files into a PEFT adapter and ``build_hf_model``
merges them into a Hugging Face model. What they give must score every token as colo's sampler does for
the trained version: PEFT's ``PeftModel``, a real ``vllm serve --lora-modules`` and transformers on the
merged model, within 1e-4 in float32. The service runs with its defaults but the dtype, float32 (bf16
rounding alone is above 1e-4); the training client with the SDK's defaults (rank 32, train_unembed=True).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import tinker
import torch
from safetensors.torch import load_file
from service_process import ServiceProcess, free_port
from tinker import types

from colo.config import Config
from colo.default_model import ensure_default_model

TOLERANCE = 1e-4
TEXT = "The capital of France is Paris. The capital of Italy is Rome, and the capital of Spain is Madrid."


@pytest.fixture(scope="module")
def base_dir():
    return ensure_default_model(Config().model_cache_dir)


@pytest.fixture(scope="module")
def f32_service(tmp_path_factory):
    work = tmp_path_factory.mktemp("f32-service")
    proc = ServiceProcess({"COLO_CHECKPOINT_DIR": str(work / "checkpoints"), "COLO_DTYPE": "float32"},
                          work / "service.log")
    proc.wait_ready(timeout=900)
    yield proc
    proc.stop()


def train(service, **lora) -> dict:
    """A run trained 3 steps; its sampler's logprobs of TEXT; its export and its training checkpoint."""
    sc = tinker.ServiceClient(base_url=service.url)
    tc = sc.create_lora_training_client(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", **lora).result()
    tokens = tc.get_tokenizer().encode(TEXT)
    d = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                                    "weights": np.ones(len(tokens) - 1, dtype=np.float32)})
    for _ in range(3):
        tc.forward_backward([d], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=2e-3)).result()
    sampler = tc.save_weights_and_get_sampling_client()
    sampled = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
    return {"tokens": tokens, "sampler": np.array(sampled[1:], dtype=np.float64),
            "external": tc.save_weights_external("final").result().path,
            "state": tc.save_state("final").result().path, "rank": tc.get_info().lora_rank}


@pytest.fixture(scope="module")
def trained(f32_service, monkeypatch_module):
    """With the SDK's defaults: rank 32, train_unembed=True."""
    monkeypatch_module.setenv("TINKER_API_KEY", "tml-cookbook")
    return train(f32_service)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def hf_logprobs(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, :-1].double()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()


@pytest.fixture(scope="module")
def downloaded(f32_service, trained, tmp_path_factory):
    from tinker_cookbook import weights

    out = tmp_path_factory.mktemp("downloads")
    external = weights.download(tinker_path=trained["external"], output_dir=str(out / "external"),
                                base_url=f32_service.url)
    state = weights.download(tinker_path=trained["state"], output_dir=str(out / "state"), base_url=f32_service.url)
    return out, external, state


def test_both_paths_download_the_trained_adapter(f32_service, trained, downloaded):
    out, external, state = downloaded
    assert sorted(os.listdir(external)) == sorted(os.listdir(state)) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    a = load_file(os.path.join(external, "adapter_model.safetensors"))
    b = load_file(os.path.join(state, "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lm_head.lora_B.weight") for k in a)  # the SDK's train_unembed=True
    # the save_state path went through an encrypted export, which the cookbook deleted after
    runs = tinker.RestClient(base_url=f32_service.url).list_user_checkpoints(limit=100).result().checkpoints
    assert [c.checkpoint_id for c in runs if c.checkpoint_type == "external"] == ["external_weights/final"]


def test_the_built_peft_adapter_scores_as_the_sampler_in_peft_and_in_vllm_serve(trained, downloaded, base_dir,
                                                                                 tmp_path):
    from peft import PeftModel
    from tinker_cookbook import weights
    from transformers import AutoModelForCausalLM

    _, external, _ = downloaded
    adapter = tmp_path / "peft"
    weights.build_lora_adapter(base_model=str(base_dir), adapter_path=external, output_path=str(adapter))

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter)
    gap = np.abs(hf_logprobs(model.eval(), trained["tokens"]) - trained["sampler"]).max()
    print(f"PeftModel vs colo's sampler: max gap {gap:.2e}")
    assert gap < TOLERANCE, gap

    served = vllm_serve_logprobs(base_dir, adapter, trained["tokens"], trained["rank"], tmp_path)
    gap = np.abs(served - trained["sampler"]).max()
    print(f"vllm serve --lora-modules vs colo's sampler: max gap {gap:.2e}")
    assert gap < TOLERANCE, gap


def test_the_merged_model_scores_as_the_sampler_in_transformers(f32_service, trained, downloaded, base_dir,
                                                                tmp_path):
    from tinker_cookbook import weights
    from tinker_cookbook.exceptions import WeightsMergeError
    from transformers import AutoModelForCausalLM

    # the default model ties its output layer to its embeddings: a LoRA on the output layer alone (the SDK's
    # train_unembed=True) has no matrix of its own to merge into, and the cookbook says so rather than
    # merging it into the embeddings too (which would change every input token)
    with pytest.raises(WeightsMergeError, match="lm_head"):
        weights.build_hf_model(base_model=str(base_dir), adapter_path=downloaded[1], output_path=str(tmp_path / "x"),
                               dtype="float32")

    run = train(f32_service, train_unembed=False)
    adapter = weights.download(tinker_path=run["external"], output_dir=str(tmp_path / "adapter"),
                               base_url=f32_service.url)
    merged = tmp_path / "merged"
    # in float32 throughout ("full"; the default "shard" keeps the base's bf16 on disk, rounding the merged sum)
    weights.build_hf_model(base_model=str(base_dir), adapter_path=adapter, output_path=str(merged), dtype="float32",
                           merge_strategy="full")
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    gap = np.abs(hf_logprobs(model, run["tokens"]) - run["sampler"]).max()
    print(f"merged model in transformers vs colo's sampler: max gap {gap:.2e}")
    assert gap < TOLERANCE, gap


def vllm_serve_logprobs(base_dir, adapter, tokens: list[int], rank: int, tmp_path) -> np.ndarray:
    """The adapter's prompt logprobs of ``tokens`` from a real ``vllm serve --lora-modules``."""
    port = free_port()
    log = open(tmp_path / "vllm-serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_dir), "--host", "127.0.0.1",
         "--port", str(port), "--enable-lora", "--max-lora-rank", str(rank), "--lora-modules", f"trained={adapter}",
         "--dtype", "float32", "--max-model-len", "512"],
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, f"vllm serve exited: {open(log.name).read()[-3000:]}"
            assert time.monotonic() < deadline, "vllm serve did not start in 300 s"
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": "trained", "prompt": tokens, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 0})
        assert r.status_code == 200, r.text
        rows = r.json()["choices"][0]["prompt_logprobs"][1:]
        return np.array([row[str(t)]["logprob"] for row, t in zip(rows, tokens[1:])])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
        log.close()
