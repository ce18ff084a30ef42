"""The sglang and mlx engines' requests and answers, against fake servers that follow those servers'
documented formats (SGLang and MLX-LM cannot run here); plus what every HTTP engine does when its
server is down or answers garbage."""

from __future__ import annotations

import json

import pytest
from fake_servers import FakeMLXServer, FakeSGLangServer
from safetensors.torch import load_file

from colo import AdamParams, Datum, SamplingParams, Trainer
from colo.errors import ConfigError, EngineError, InvalidRequestError
from colo.types import SampleJob


@pytest.fixture
def sglang():
    server = FakeSGLangServer()
    yield server
    server.close()


def make_trainer(tiny_model_dir, engine, url) -> Trainer:
    return Trainer(model=str(tiny_model_dir), dtype="float32", engine=engine, engine_url=url, device="cpu")


def step(trainer, adapter):
    trainer.forward_backward(adapter, [Datum.from_sequence(list(range(10, 20)))])
    trainer.optim_step(adapter, AdamParams(learning_rate=1e-3))


def test_sglang_loads_each_version_under_a_fresh_name_and_samples_token_ids(tiny_model_dir, sglang):
    t = make_trainer(tiny_model_dir, "sglang", sglang.url)
    try:
        a = t.create_lora(rank=4)
        first = sglang.posted("/load_lora_adapter")[-1]
        files = {p.name for p in __import__("pathlib").Path(first["lora_path"]).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files  # a PEFT directory
        step(t, a)
        second = sglang.posted("/load_lora_adapter")[-1]
        assert second["lora_name"] != first["lora_name"]
        assert sglang.posted("/unload_lora_adapter")[-1] == {"lora_name": first["lora_name"]}
        assert list(sglang.loaded) == [second["lora_name"]]

        prompt = [3, 4, 5]
        result = t.sample_batch([SampleJob(a, prompt, 2, SamplingParams(max_tokens=4, seed=7, stop=(9,)),
                                           prompt_logprobs=True)])[0]
        sent = sglang.posted("/generate")[-1]
        assert sent["input_ids"] == [prompt, prompt] and sent["lora_path"] == [second["lora_name"]] * 2
        assert sent["return_logprob"] is True and sent["logprob_start_len"] == 0
        assert sent["sampling_params"]["max_new_tokens"] == 4 and sent["sampling_params"]["sampling_seed"] == 7
        assert sent["sampling_params"]["stop_token_ids"] == [9]
        assert result.adapter_version == 1 and len(result.sequences) == 2
        assert result.sequences[0].tokens == [6, 7, 8, 9] and result.sequences[0].logprobs == [-0.25, -0.5, -0.75, -1.0]
        assert result.sequences[0].stop_reason == "length"
        assert result.prompt_logprobs == [None, -1.0, -1.0]
        base = t.sample(None, [prompt], 1, SamplingParams(max_tokens=1))[0]
        assert "lora_path" not in sglang.posted("/generate")[-1] and base.adapter is None
    finally:
        t.close()
    assert sglang.loaded == {}  # shutdown unloads what colo loaded


def test_sglang_without_lora_is_refused_at_start(tiny_model_dir):
    server = FakeSGLangServer(enable_lora=False)
    try:
        with pytest.raises(EngineError, match="without --enable-lora"):
            make_trainer(tiny_model_dir, "sglang", server.url)
    finally:
        server.close()


def test_mlx_writes_its_adapter_format_and_names_it_per_request(tiny_model_dir):
    from transformers import AutoTokenizer

    server = FakeMLXServer(AutoTokenizer.from_pretrained(tiny_model_dir))
    t = make_trainer(tiny_model_dir, "mlx", server.url)
    try:
        a = t.create_lora(rank=4, alpha=8)
        step(t, a)
        prompt = t.tokenizer.encode("hello world")
        result = t.sample(a, [prompt], 2, SamplingParams(max_tokens=3, seed=1))[0]
        sent = server.posted("/v1/completions")
        assert len(sent) == 2 and sent[0]["logprobs"] is True and sent[0]["max_tokens"] == 3
        assert t.tokenizer.encode(sent[0]["prompt"]) == prompt
        adapter_dir = __import__("pathlib").Path(sent[0]["adapters"])
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == 4
        assert config["lora_parameters"]["scale"] == 2.0 and config["num_layers"] == 2
        weights = load_file(str(adapter_dir / "adapters.safetensors"))
        peft = {k: p for k, p in t.adapters[a].params.items() if "layers.0.self_attn.q_proj" in k}
        a_key = next(k for k in peft if "lora_A" in k)
        assert weights["model.layers.0.self_attn.q_proj.lora_a"].shape == peft[a_key].T.shape  # (in, r)
        assert result.sequences[0].tokens == [(prompt[-1] + i) % 500 for i in (1, 2, 3)]
        assert result.adapter_version == 1
        step(t, a)
        assert not adapter_dir.exists()  # the replaced version's files are gone
        # MLX-LM's server gives no prompt logprobs: the Trainer scores the prompt with its own model
        scored = t.sample_batch([SampleJob(a, prompt, 1, SamplingParams(max_tokens=1), prompt_logprobs=True)])[0]
        assert scored.prompt_logprobs == pytest.approx(t.compute_logprobs(a, prompt), abs=1e-6)
        assert scored.prompt_logprobs[0] is None and len(scored.prompt_logprobs) == len(prompt)
        with pytest.raises(InvalidRequestError, match="stop on token ids"):
            t.sample_batch([SampleJob(a, prompt, 1, SamplingParams(max_tokens=1, stop=(5,)))])
    finally:
        t.close()
        server.close()


def test_garbage_answers_and_a_dead_server_give_one_clear_error_naming_the_url(tiny_model_dir, sglang):
    t = make_trainer(tiny_model_dir, "sglang", sglang.url)
    try:
        a = t.create_lora(rank=4)
        sglang.garbage = True
        with pytest.raises(EngineError, match=f"{sglang.url}/generate: the answer is not JSON"):
            t.sample(a, [[1, 2]], 1, SamplingParams(max_tokens=2))
        sglang.garbage = False
        sglang.close()
        with pytest.raises(EngineError, match=f"{sglang.url}/generate: cannot reach the server after 4 tries"):
            t.sample(a, [[1, 2]], 1, SamplingParams(max_tokens=2))
        assert t.version(a) == 0 and a in t.adapters
    finally:
        t.close()


def test_http_engine_without_url_names_the_setting(tiny_model_dir):
    with pytest.raises(ConfigError, match="COLO_ENGINE=mlx needs COLO_ENGINE_URL"):
        Trainer(model=str(tiny_model_dir), dtype="float32", engine="mlx", device="cpu")
