"""The Tinker API service, driven by the official ``tinker`` SDK against a real service process."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import tinker
from conftest import ALICE, BOB
from tinker import types
from transformers import AutoTokenizer

LR = 1e-2
SESSION = {"tags": [], "user_metadata": {}, "sdk_version": "test"}


def client(service, key: str = ALICE) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=service.url, api_key=key)


def datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                                       "weights": np.ones(len(tokens) - 1, dtype=np.float32)})


def overfit(training_client, tokens: list[int], steps: int = 40) -> float:
    for _ in range(steps):
        fb = training_client.forward_backward([datum(tokens)], "cross_entropy")
        step = training_client.optim_step(types.AdamParams(learning_rate=LR))
        loss = fb.result().metrics["loss:sum"]
        step.result()
    return loss


def greedy(sampling_client, prompt: list[int], n: int) -> list[int]:
    params = types.SamplingParams(max_tokens=n, temperature=0.0)
    return list(sampling_client.sample(types.ModelInput.from_ints(prompt), 1, params).result().sequences[0].tokens)


@pytest.fixture(scope="module")
def tokens(service):
    tok = AutoTokenizer.from_pretrained(service.model_name)
    return lambda text: tok.encode(text)


def test_sdk_overfits_saves_for_sampler_and_recites(service, tokens):
    sc = client(service)
    tc = sc.create_lora_training_client(base_model=service.model_name, rank=8, train_unembed=False).result()
    info = tc.get_info()
    assert info.lora_rank == 8 and info.model_data.model_name == service.model_name
    seq = tokens("the quick brown fox jumps over the lazy dog")
    first = tc.forward([datum(seq)], "cross_entropy").result().metrics["loss:sum"]
    last = overfit(tc, seq)
    assert last < 0.7 * first, (first, last)

    path = tc.save_weights_for_sampler("recite").result().path
    assert path.startswith("tinker://") and path.endswith("/sampler_weights/recite")
    sampler = tc.create_sampling_client(path).result()
    assert greedy(sampler, seq[:3], len(seq) - 3) == seq[3:]
    assert tc.get_tokenizer().encode("the quick") == seq[:len(tokens("the quick"))]


def test_sampler_prompt_logprobs_agree_with_trainer(service, tokens):
    tc = client(service).create_lora_training_client(base_model=service.model_name, rank=8,
                                                     train_unembed=False).result()
    seq = tokens("pack my box with five dozen liquor jugs")
    overfit(tc, seq, steps=5)
    trainer_lp = tc.forward([datum(seq)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    sampler = tc.save_weights_and_get_sampling_client().result()
    out = sampler.sample(types.ModelInput.from_ints(seq), 1, types.SamplingParams(max_tokens=1),
                         include_prompt_logprobs=True).result()
    assert out.prompt_logprobs[0] is None
    sampler_lp = np.array(out.prompt_logprobs[1:], dtype=np.float64)
    gap = np.abs(sampler_lp - trainer_lp).max()
    assert gap < 1e-4, gap  # float32 on both sides: measured ~1e-6
    assert sampler.compute_logprobs(types.ModelInput.from_ints(seq)).result()[1] == pytest.approx(
        float(trainer_lp[0]), abs=1e-4)


def test_snapshot_sampler_keeps_its_version_while_training_goes_on(service, tokens):
    tc = client(service).create_lora_training_client(base_model=service.model_name, rank=8,
                                                     train_unembed=False).result()
    seq = tokens("sphinx of black quartz judge my vow")
    overfit(tc, seq, steps=3)
    before = tc.save_weights_and_get_sampling_client().result()
    lp_before = before.compute_logprobs(types.ModelInput.from_ints(seq)).result()
    overfit(tc, seq, steps=3)
    after = tc.save_weights_and_get_sampling_client().result()
    lp_after = after.compute_logprobs(types.ModelInput.from_ints(seq)).result()
    assert max(abs(a - b) for a, b in zip(lp_before[1:], lp_after[1:])) > 1e-3  # training moved on
    again = before.compute_logprobs(types.ModelInput.from_ints(seq)).result()  # the old snapshot, frozen
    assert max(abs(a - b) for a, b in zip(lp_before[1:], again[1:])) < 1e-4


def test_save_state_then_load_it_into_the_same_and_into_a_new_training_client(service, tokens):
    sc = client(service)
    tc = sc.create_lora_training_client(base_model=service.model_name, rank=8, train_unembed=False).result()
    seq = tokens("saved and loaded again")
    overfit(tc, seq, steps=3)
    path = tc.save_state("mid").result().path
    assert path.endswith("/weights/mid")
    saved = tc.forward([datum(seq)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    overfit(tc, seq, steps=2)  # move away from the checkpoint
    moved = tc.forward([datum(seq)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    assert np.abs(moved - saved).max() > 1e-3

    tc.load_state_with_optimizer(path).result()
    back = tc.forward([datum(seq)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(back, saved, atol=1e-6)

    fresh = sc.create_training_client_from_state_with_optimizer(path).result()
    assert fresh.model_id != tc.model_id and fresh.get_info().lora_rank == 8
    loaded = fresh.forward([datum(seq)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(loaded, saved, atol=1e-6)
    # both continue identically from the same weights and optimizer state
    a, b = overfit(tc, seq, steps=1), overfit(fresh, seq, steps=1)
    assert a == pytest.approx(b, abs=1e-4)


def test_three_clients_in_threads_train_and_sample_their_own_adapters(service, tokens):
    texts = ["alpha beta gamma delta", "one two three four five", "red orange yellow green"]
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            seq = tokens(texts[i])
            tc = client(service).create_lora_training_client(base_model=service.model_name, rank=8, seed=i,
                                                             train_unembed=False).result()
            overfit(tc, seq, steps=60)
            sampler = tc.save_weights_and_get_sampling_client().result()
            results[i] = (seq, greedy(sampler, seq[:2], len(seq) - 2))
        except BaseException as e:  # reported by the main thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    for i in range(3):
        assert not isinstance(results[i], BaseException), results[i]
        seq, sampled = results[i]
        assert sampled == seq[2:], f"client {i} recited {sampled}, trained on {seq[2:]}"


def post(service, path: str, key: str | None = ALICE, headers: dict | None = None, **kwargs) -> httpx.Response:
    headers = {**(headers or {}), **({"X-API-Key": key} if key else {})}
    return httpx.post(service.url + path, headers=headers, timeout=60, **kwargs)


def test_a_second_tenant_cannot_touch_the_first_ones_adapter(service, tokens):
    tc = client(service, ALICE).create_lora_training_client(base_model=service.model_name, rank=8,
                                                            train_unembed=False).result()
    seq = tokens("private to alice")
    overfit(tc, seq, steps=2)
    path = tc.save_state("alice-state").result().path
    sampler_path = tc.save_weights_for_sampler("alice-sampler").result().path
    before = tc.forward([datum(seq)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()

    bob_session = post(service, "/api/v1/create_session", BOB, json=SESSION).json()
    assert "session_id" in bob_session
    model_id = tc.model_id
    for route, body in [
        ("/api/v1/get_info", {"model_id": model_id}),
        ("/api/v1/optim_step", {"model_id": model_id, "seq_id": 99, "adam_params": {"learning_rate": 1.0}}),
        ("/api/v1/save_weights", {"model_id": model_id, "path": "stolen", "seq_id": 99}),
        ("/api/v1/save_weights_for_sampler", {"model_id": model_id, "path": "stolen", "seq_id": 99}),
        ("/api/v1/load_weights", {"model_id": model_id, "path": path, "seq_id": 99, "optimizer": True}),
        ("/api/v1/load_weights", {"session_id": bob_session["session_id"], "model_seq_id": 0, "path": path,
                                  "optimizer": True}),
        ("/api/v1/create_sampling_session", {"session_id": bob_session["session_id"],
                                             "sampling_session_seq_id": 0, "model_path": sampler_path}),
    ]:
        r = post(service, route, BOB, json=body)
        assert r.status_code == 404, (route, r.status_code, r.text)
    # nor can bob read alice's futures, or pass with no key or a wrong one
    rid = post(service, "/api/v1/asample", ALICE, json={
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": seq}]}, "sampling_params": {"max_tokens": 1},
        "num_samples": 1, "base_model": service.model_name}).json()
    assert post(service, "/api/v1/retrieve_future", BOB, json={"request_id": rid["request_id"]}).status_code == 404
    assert post(service, "/api/v1/get_info", None, json={"model_id": model_id}).status_code == 401
    assert post(service, "/api/v1/get_info", "tml-wrong", json={"model_id": model_id}).status_code == 401
    # alice's model is as it was
    after = tc.forward([datum(seq)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_array_equal(before, after)
    assert not list(service.checkpoint_dir.glob("bob/**/stolen*"))  # bob has models of his own in other tests


def test_checkpoint_names_cannot_escape(service):
    tc = client(service).create_lora_training_client(base_model=service.model_name, rank=4,
                                                     train_unembed=False).result()
    session = post(service, "/api/v1/create_session", json=SESSION).json()["session_id"]
    for name in ["../../evil", "/etc/passwd", ".hidden", "a/b", "x" * 200, "nul\x00"]:
        r = post(service, "/api/v1/save_weights", json={"model_id": tc.model_id, "path": name, "seq_id": 50})
        assert r.status_code == 400, (name, r.text)
        assert "checkpoint name" in r.json()["detail"]
    for path in ["tinker://../weights/x", "tinker://a/b", "file:///etc/passwd", f"tinker://{tc.model_id}/weights/..",
                 f"tinker://{tc.model_id}/other/x"]:
        r = post(service, "/api/v1/create_sampling_session",
                 json={"session_id": session, "sampling_session_seq_id": 0, "model_path": path})
        assert r.status_code == 400, (path, r.text)
    escaped = [p for p in service.checkpoint_dir.parent.rglob("*") if "evil" in p.name or "passwd" in p.name]
    assert escaped == []


def test_malformed_and_oversized_requests_get_4xx_and_the_server_stays_up(service):
    cases = [
        ("/api/v1/create_session", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
        ("/api/v1/create_model", {"json": {"session_id": 3}}),
        ("/api/v1/optim_step", {"json": {"model_id": "x", "adam_params": {"learning_rate": "fast"}}}),
        ("/api/v1/asample", {"json": {"prompt": {"chunks": []}, "sampling_params": {}, "num_samples": "many"}}),
        ("/api/v1/forward_backward", {"content": b"\xff\x00garbage", "headers": {"content-type": "application/x-protobuf"}}),
        ("/api/v1/forward_backward", {"json": {"model_id": "x"}}),
        ("/api/v1/retrieve_future", {"json": {"request_id": "nope"}}),
        ("/api/v1/create_session", {"content": b"x" * (65 * 1024 * 1024)}),
    ]
    for route, kwargs in cases:
        r = post(service, route, **kwargs)
        assert 400 <= r.status_code < 500, (route, r.status_code, r.text[:200])
        assert r.json()["detail"], route
    assert httpx.get(service.url + "/api/v1/healthz").json()["status"] == "ok"


def test_bad_job_inputs_fail_the_job_with_a_user_error_and_change_nothing(service, tokens):
    sc = client(service)
    with pytest.raises(tinker.RequestFailedError, match="rank"):
        sc.create_lora_training_client(base_model=service.model_name, rank=64, train_unembed=False).result()
    tc = sc.create_lora_training_client(base_model=service.model_name, rank=8, train_unembed=False).result()
    seq = tokens("unchanged by bad requests")
    before = tc.forward([datum(seq)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    sampler = tc.save_weights_and_get_sampling_client().result()
    with pytest.raises(tinker.RequestFailedError, match="token id 1000000; allowed: token ids in"):
        sampler.sample(types.ModelInput.from_ints([1, 2, 10**6]), 1, types.SamplingParams(max_tokens=2)).result()
    with pytest.raises(tinker.RequestFailedError, match="context|longer"):
        sampler.sample(types.ModelInput.from_ints([5] * 400), 1, types.SamplingParams(max_tokens=2)).result()
    bad = client(service).create_lora_training_client(base_model=service.model_name, rank=8,
                                                      train_unembed=False).result()
    with pytest.raises(tinker.RequestFailedError, match="loss"):
        bad.forward_backward([datum(seq)], "no_such_loss").result()
    after = tc.forward([datum(seq)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_array_equal(before, after)
    assert greedy(sampler, seq[:2], 3)  # the sampler still serves


def test_forward_backward_custom_runs_in_the_client_and_trains_as_the_same_loss_on_the_server(service, tokens):
    seq = tokens("a custom loss computed by the client")
    a = client(service).create_lora_training_client(base_model=service.model_name, rank=8, seed=5,
                                                    train_unembed=False).result()
    b = client(service).create_lora_training_client(base_model=service.model_name, rank=8, seed=5,
                                                    train_unembed=False).result()

    def doubled_nll(data, logprobs):  # the SDK differentiates it and sends the gradient as weights
        loss = sum(-2.0 * lp.sum() for lp in logprobs)
        return loss, {"doubled_nll": float(loss.detach())}

    out = a.forward_backward_custom([datum(seq)], doubled_nll).result()
    a.optim_step(types.AdamParams(learning_rate=LR)).result()
    doubled = types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                          loss_fn_inputs={"target_tokens": np.array(seq[1:], dtype=np.int64),
                                          "weights": np.full(len(seq) - 1, 2.0, dtype=np.float32)})
    b.forward_backward([doubled], "cross_entropy").result()
    b.optim_step(types.AdamParams(learning_rate=LR)).result()
    assert out.metrics["doubled_nll"] > 0
    after_a = a.forward([datum(seq)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    after_b = b.forward([datum(seq)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(after_a, after_b, atol=1e-5)
