"""The OpenAI-compatible routes, driven by the official ``openai`` client against the real service."""

from __future__ import annotations

import numpy as np
import openai
import pytest
import tinker
from conftest import ALICE, BOB
from test_service import client, datum, overfit, tokens  # noqa: F401 (tokens is a fixture)
from tinker import types
from transformers import AutoTokenizer


def oai(service, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.url + "/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def trained(service, tokens):
    """An adapter of alice's that recites a sequence, its sampler path, and the SDK's greedy sample of it."""
    tc = client(service).create_lora_training_client(base_model=service.model_name, rank=8,
                                                     train_unembed=False).result()
    seq = tokens("the blue river ran to the green stone tree")
    overfit(tc, seq, steps=30)
    path = tc.save_weights_for_sampler("for-openai").result().path
    sampler = tc.create_sampling_client(path).result()
    greedy = sampler.sample(types.ModelInput.from_ints(seq[:3]), 1,
                            types.SamplingParams(max_tokens=8, temperature=0.0)).result().sequences[0]
    return tc, seq, path, list(greedy.tokens)


def test_completions_from_a_live_adapter_equal_the_sdks_sample_with_token_ids_and_logprobs(service, trained):
    tc, seq, _, sdk_tokens = trained
    out = oai(service).completions.create(model=tc.model_id, prompt=seq[:3], max_tokens=8, temperature=0,
                                          logprobs=1, extra_body={"return_tokens_as_token_ids": True})
    choice = out.choices[0]
    ids = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
    assert ids == sdk_tokens
    assert out.system_fingerprint == f"{tc.model_id}@v30"
    ours = tc.forward([datum(seq[:3] + ids)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(choice.logprobs.token_logprobs, ours[2:], atol=1e-4)
    assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens == len(ids)


def test_a_saved_version_is_served_by_its_path_and_text_prompts_work(service, trained):
    tc, seq, path, sdk_tokens = trained
    client_ = oai(service)
    out = client_.completions.create(model=path, prompt=seq[:3], max_tokens=8, temperature=0)
    tokenizer = AutoTokenizer.from_pretrained(service.model_name)  # the files the service loads
    assert out.choices[0].text == tokenizer.decode(sdk_tokens, skip_special_tokens=True)
    assert out.system_fingerprint.endswith("@v30")
    text = client_.completions.create(model=tc.model_id, prompt="the blue", max_tokens=4, temperature=0, n=2)
    assert len(text.choices) == 2 and text.choices[0].text == text.choices[1].text


def test_streaming_gives_the_same_text(service, trained):
    tc, seq, _, _ = trained
    plain = oai(service).completions.create(model=tc.model_id, prompt=seq[:3], max_tokens=8, temperature=0)
    chunks = list(oai(service).completions.create(model=tc.model_id, prompt=seq[:3], max_tokens=8, temperature=0,
                                                  stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text


def test_models_lists_the_tenants_own_and_another_tenant_cannot_name_them(service, trained):
    tc, seq, path, _ = trained
    ids = {m.id for m in oai(service).models.list()}
    assert {service.model_name, tc.model_id, path} <= ids
    bobs = {m.id for m in oai(service, BOB).models.list()}
    assert tc.model_id not in bobs and path not in bobs
    for name in (tc.model_id, path):
        with pytest.raises(openai.NotFoundError):
            oai(service, BOB).completions.create(model=name, prompt=seq[:3], max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        oai(service, "tml-wrong").models.list()


@pytest.mark.parametrize("kwargs, says", [
    ({"temperature": -1.0}, "temperature"), ({"n": 0}, "num_samples"), ({"max_tokens": 0}, "max_tokens"),
    ({"seed": 2**64}, "seed"), ({"logprobs": 5}, "logprobs"), ({"model": "no-such-model"}, "unknown model"),
    ({"prompt": [10**7]}, "token id"),
])
def test_a_bad_request_gets_a_4xx_in_openais_shape(service, trained, kwargs, says):
    tc, seq, _, _ = trained
    args = {"model": tc.model_id, "prompt": seq[:3], "max_tokens": 2, **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        oai(service).completions.create(**args)
    assert 400 <= e.value.status_code < 500
    assert says in e.value.message, e.value.message


def test_chat_completions_on_the_default_model_equal_the_sdks_sample(default_service):
    sc = tinker.ServiceClient(base_url=default_service.url, api_key="tml-chat")
    tc = sc.create_lora_training_client(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", rank=8)
    tokenizer = tc.get_tokenizer()
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    sampler = tc.save_weights_and_get_sampling_client().result()
    sdk = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                         types.SamplingParams(max_tokens=12, temperature=0.0)).result().sequences[0]
    chat = openai.OpenAI(base_url=default_service.url + "/v1", api_key="tml-chat", max_retries=0)
    out = chat.chat.completions.create(model=tc.model_id, messages=messages, max_tokens=12, temperature=0,
                                       logprobs=True)
    ids = [t for t in sdk.tokens if t not in (tokenizer.eos_token_id,)]
    assert out.choices[0].message.content == tokenizer.decode(ids, skip_special_tokens=True)
    assert [c.logprob for c in out.choices[0].logprobs.content] == pytest.approx(list(sdk.logprobs), abs=1e-6)
    streamed = chat.chat.completions.create(model=tc.model_id, messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == out.choices[0].message.content
