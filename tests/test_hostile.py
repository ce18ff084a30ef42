"""Hostile and malformed requests against the real service, while another tenant keeps working.

Tenant bob trains and samples through the official SDK the whole time; tenant alice sends every bad
value the isolation issue found and a few hundred generated malformed requests. No answer may be a
5xx, no job may fail as a "server" error, bob must see no error and no stall, and alice's own earlier
model must be exactly as it was. (The session's service fixture checks the clean SIGTERM stop.)
"""

from __future__ import annotations

import json
import random
import threading
import time

import httpx
import numpy as np
import pytest
import tinker
from conftest import ALICE, BOB, CAROL
from test_service import SESSION, client, datum, post, tokens  # noqa: F401 (tokens is a fixture)
from tinker import types
from tinker.proto import tinker_public_pb2 as pb

PROTO = {"content-type": "application/x-protobuf"}
FUZZ_CASES = 300
STALL_SECONDS = 30.0  # bob's slowest train+sample cycle while the attack runs (about 1 s when quiet)


def outcome(service, key: str, response: httpx.Response, deadline: float = 120.0) -> tuple[int, dict | None]:
    """(HTTP status, the job's error body or None): a request that was taken is followed to its end."""
    assert response.status_code < 500, (response.request.url, response.status_code, response.text[:300])
    if response.status_code != 200 or "request_id" not in response.json():
        return response.status_code, None
    rid = response.json()["request_id"]
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        r = post(service, "/api/v1/retrieve_future", key, json={"request_id": rid})
        assert r.status_code < 500, r.text[:300]
        if r.status_code == 408:
            continue
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        error = body if "error" in body else None
        assert error is None or error["category"] == "user", (response.request.url, error)
        return 200, error
    raise AssertionError(f"request {rid} did not finish in {deadline} s")


def forward_backward_body(model_id: str, seq_id: int, tokens: list[int], shape: list[int] | None = None,
                          loss_fn: str = "cross_entropy") -> bytes:
    targets = np.array(tokens[1:], dtype=np.int64)
    weights = np.ones(len(tokens) - 1, dtype=np.float32)
    d = pb.Datum()
    d.model_input.add().encoded_text.tokens = np.array(tokens[:-1], dtype=np.int32).tobytes()
    d.loss_fn_inputs["target_tokens"].CopyFrom(pb.Tensor(dtype=pb.DTYPE_INT64, dense=targets.tobytes(),
                                                         shape=shape or [len(targets)]))
    d.loss_fn_inputs["weights"].CopyFrom(pb.Tensor(dtype=pb.DTYPE_FLOAT32, dense=weights.tobytes(),
                                                   shape=[len(weights)]))
    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn=loss_fn)
    msg.data.append(d)
    return msg.SerializeToString()


class SecondTenant:
    """Bob trains and samples in a loop through the SDK, timing each cycle and keeping any error."""

    def __init__(self, service, tokens) -> None:
        self.tc = client(service, BOB).create_lora_training_client(base_model=service.model_name, rank=8,
                                                                    train_unembed=False).result()
        self.seq = tokens("bob trains and samples while alice attacks")
        self.cycles: list[float] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                start = time.monotonic()
                fb = self.tc.forward_backward([datum(self.seq)], "cross_entropy")
                step = self.tc.optim_step(types.AdamParams(learning_rate=1e-2))
                fb.result(), step.result()
                sampler = self.tc.save_weights_and_get_sampling_client().result()
                out = sampler.sample(types.ModelInput.from_ints(self.seq[:3]), 2,
                                     types.SamplingParams(max_tokens=4, seed=len(self.cycles))).result()
                assert len(out.sequences) == 2 and all(len(s.tokens) > 0 for s in out.sequences)
                self.cycles.append(time.monotonic() - start)
        except BaseException as e:  # reported by finish()
            self.errors.append(e)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(300)
        assert not self.thread.is_alive(), "bob's cycle never finished: the service stalled"
        assert not self.errors, self.errors
        assert self.cycles, "bob completed no cycle"
        assert max(self.cycles) < STALL_SECONDS, self.cycles


def raw_model(service, key: str) -> tuple[str, str]:
    """(session id, model id) of a model made with plain HTTP, so the test owns its seq_ids."""
    session = post(service, "/api/v1/create_session", key, json=SESSION).json()["session_id"]
    r = post(service, "/api/v1/create_model", key, json={
        "session_id": session, "model_seq_id": 0, "base_model": service.model_name,
        "lora_config": {"rank": 8, "train_unembed": False}})
    status, error = outcome(service, key, r)
    assert status == 200 and error is None, error
    return session, f"{session}:train:0"


def fuzz_requests(rng: random.Random, model_id: str, session: str, base_model: str, prompt: list[int]):
    """``FUZZ_CASES`` malformed requests: valid bodies of each route with a field broken, dropped, added, or
    the whole body mangled; forward_backward protobufs with broken tensors or bytes."""
    valid = {
        "/api/v1/create_model": {"session_id": session, "model_seq_id": 1, "base_model": base_model,
                                 "lora_config": {"rank": 8, "train_unembed": False}},
        "/api/v1/optim_step": {"model_id": model_id, "seq_id": 1,
                               "adam_params": {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}},
        "/api/v1/save_weights": {"model_id": model_id, "seq_id": 1, "path": "fuzz"},
        "/api/v1/save_weights_for_sampler": {"model_id": model_id, "seq_id": 1, "path": "fuzz"},
        "/api/v1/load_weights": {"model_id": model_id, "seq_id": 1, "path": f"tinker://{model_id}/weights/x"},
        "/api/v1/create_sampling_session": {"session_id": session, "sampling_session_seq_id": 0,
                                            "base_model": base_model},
        "/api/v1/asample": {"prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
                            "sampling_params": {"max_tokens": 4, "temperature": 1.0, "seed": 1},
                            "num_samples": 2, "base_model": base_model},
        "/api/v1/get_info": {"model_id": model_id},
        "/api/v1/unload_model": {"model_id": model_id},
        "/api/v1/retrieve_future": {"request_id": "0" * 32},
        "/api/v1/session_heartbeat": {"session_id": session},
    }
    evil = [None, -1, 0, 2**64, -2**63 - 1, 10**30, 1e308, -1e308, 0.5, True, "", "NaN", "x" * 5000, "../../etc",
            "\u0000", [], [1, -5, 10**12], {}, {"a": {"b": [None]}}, "tinker://../../x", 10**6]

    def leaves(body, path=()):
        for k, v in body.items():
            yield path + (k,)
            if isinstance(v, dict):
                yield from leaves(v, path + (k,))

    def set_at(body, path, value, delete=False):
        for k in path[:-1]:
            body = body.get(k) if isinstance(body, dict) else None
        if not isinstance(body, dict):
            return
        if delete:
            body.pop(path[-1], None)
        else:
            body[path[-1]] = value

    for i in range(FUZZ_CASES):
        kind = rng.random()
        if kind < 0.15:  # forward_backward protobufs
            tokens = prompt + [rng.choice([3, 7, 10**7, -4])]
            body = forward_backward_body(model_id, rng.choice([0, 2**31 - 1, 10**6, 1]), tokens,
                                         shape=rng.choice([None, [-1, -len(tokens) + 1], [0], [2**40]]),
                                         loss_fn=rng.choice(["cross_entropy", "ppo", "nope", ""]))
            if rng.random() < 0.4:
                b = bytearray(body)
                for _ in range(rng.randint(1, 6)):
                    b[rng.randrange(len(b))] = rng.randrange(256)
                body = bytes(b)
            yield "/api/v1/forward_backward", {"content": body, "headers": PROTO}
            continue
        route = rng.choice(sorted(valid))
        body = json.loads(json.dumps(valid[route]))
        if kind < 0.25:  # the whole body mangled
            yield route, {"content": rng.choice([b"", b"[]", b"null", b"{\"a\":", b"\xff\xfe", b"1e999",
                                                 json.dumps(valid[route]).encode()[: rng.randint(1, 20)]]),
                          "headers": {"content-type": "application/json"}}
            continue
        paths = list(leaves(body))
        for _ in range(rng.randint(1, 3)):
            choice = rng.random()
            if choice < 0.7:
                set_at(body, rng.choice(paths), rng.choice(evil))
            elif choice < 0.85:
                set_at(body, rng.choice(paths), None, delete=True)
            else:
                body[f"extra_{i}"] = rng.choice(evil)
            paths = list(leaves(body)) or [("x",)]
        yield route, {"json": body}


def test_hostile_requests_fail_alone_while_another_tenant_works(service, tokens):
    # alice's earlier model, which nothing below may change
    earlier = client(service, ALICE).create_lora_training_client(base_model=service.model_name, rank=8,
                                                                 train_unembed=False).result()
    seq = tokens("alice keeps this model as it is")
    for _ in range(2):
        earlier.forward_backward([datum(seq)], "cross_entropy").result()
        earlier.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    before = earlier.forward([datum(seq)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()

    bob = SecondTenant(service, tokens)
    session, target = raw_model(service, ALICE)
    prompt = tokens("the cat sat on")
    base = service.model_name

    def sample(params: dict, num_samples: int = 1, **extra) -> httpx.Response:
        return post(service, "/api/v1/asample", json={
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]}, "sampling_params": params,
            "num_samples": num_samples, "base_model": base, **extra})

    def refused(response: httpx.Response, fragment: str) -> None:
        """A 4xx, or a job that failed as the caller's error, saying ``fragment``."""
        status, error = outcome(service, ALICE, response)
        text = response.text if status != 200 else (error or {}).get("error", "")
        assert status != 200 or error is not None, f"taken and run: {response.request.url}"
        assert fragment in text, (fragment, status, text[:300])

    # the cases of the isolation issue, each alone
    refused(sample({"max_tokens": 4, "seed": 2**64}), "seed")
    refused(sample({"max_tokens": 4, "temperature": 5.0}), "temperature")
    refused(post(service, "/api/v1/asample", headers={"content-type": "application/json"}, content=(
        b'{"prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6]}]}, "num_samples": 1, '
        b'"sampling_params": {"max_tokens": 4, "temperature": Infinity}, "base_model": "' + base.encode() + b'"}')),
        "temperature")
    refused(sample({"max_tokens": 4}, num_samples=10**6), "num_samples")
    refused(post(service, "/api/v1/optim_step", json={"model_id": target, "seq_id": 1,
                                                      "adam_params": {"learning_rate": 1e30}}), "learning_rate")
    refused(post(service, "/api/v1/create_model", json={
        "session_id": session, "model_seq_id": 5, "base_model": base,
        "lora_config": {"rank": 8, "seed": 2**64, "train_unembed": False}}), "seed")
    refused(post(service, "/api/v1/forward_backward", headers=PROTO,
                 content=forward_backward_body(target, 2, prompt, shape=[-1, -(len(prompt) - 1)])), "dimensions >= 0")
    refused(post(service, "/api/v1/save_weights", json={"model_id": target, "seq_id": 2, "path": "name\n"}),
            "checkpoint name")
    refused(post(service, "/api/v1/optim_step", json={"model_id": target, "seq_id": 10**9,
                                                      "adam_params": {"learning_rate": 1e-3}}), "far ahead")
    assert post(service, "/api/v1/telemetry", None, json={"events": []}).status_code == 401
    assert post(service, "/api/v1/telemetry", content=b"x" * (2 << 20)).status_code == 413
    # the target model still takes its next seq_id (2: the refused optim_step at 1 used it)
    status, error = outcome(service, ALICE, post(service, "/api/v1/forward_backward", headers=PROTO,
                                                 content=forward_backward_body(target, 2, prompt)))
    assert (status, error) == (200, None)

    # a few hundred generated malformed requests
    rng = random.Random(0)
    statuses: dict[int, int] = {}
    for route, kwargs in fuzz_requests(rng, target, session, base, prompt):
        status, _ = outcome(service, ALICE, post(service, route, **kwargs))
        statuses[status] = statuses.get(status, 0) + 1
    assert sum(statuses.values()) == FUZZ_CASES
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) > FUZZ_CASES // 2, statuses

    bob.finish()
    after = earlier.forward([datum(seq)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_array_equal(before, after)
    health = httpx.get(service.url + "/api/v1/healthz").json()
    assert health["status"] == "ok", health
    log = service.tail(10**6)
    assert "Exception in ASGI application" not in log and "unexpected error" not in log  # all were expected


def test_prompt_logprobs_with_more_samples_than_prompt_tokens_over_the_sdk(service, tokens):
    tc = client(service).create_lora_training_client(base_model=service.model_name, rank=8,
                                                     train_unembed=False).result()
    prompt = tokens("the cat sat")
    tc.forward_backward([datum(prompt + prompt)], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    sampler = tc.save_weights_and_get_sampling_client().result()
    out = sampler.sample(types.ModelInput.from_ints(prompt), 12, types.SamplingParams(max_tokens=2, seed=0),
                         include_prompt_logprobs=True).result()
    assert len(out.sequences) == 12 and len(prompt) < 12
    ours = tc.forward([datum(prompt)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    assert out.prompt_logprobs[0] is None
    np.testing.assert_allclose(out.prompt_logprobs[1:], ours, atol=1e-4)


def test_a_tenant_quota_bounds_its_models_and_unload_frees_one(service):
    limit = 32  # COLO_MAX_MODELS_PER_TENANT in the service fixture
    session = post(service, "/api/v1/create_session", CAROL, json=SESSION).json()["session_id"]

    def create(seq: int) -> httpx.Response:
        return post(service, "/api/v1/create_model", CAROL, json={
            "session_id": session, "model_seq_id": seq, "base_model": service.model_name,
            "lora_config": {"rank": 1, "train_unembed": False}})

    for seq in range(limit):
        assert outcome(service, CAROL, create(seq)) == (200, None)
    status, error = outcome(service, CAROL, create(limit))
    assert error is not None and f"holds {limit} models; allowed: at most {limit} (COLO_MAX_MODELS_PER_TENANT)" \
        in error["error"], error
    # another tenant is not bound by carol's count
    assert client(service, BOB).create_lora_training_client(base_model=service.model_name, rank=1,
                                                            train_unembed=False).result().model_id
    r = post(service, "/api/v1/unload_model", CAROL, json={"model_id": f"{session}:train:0"})
    assert outcome(service, CAROL, r) == (200, None)
    assert post(service, "/api/v1/get_info", CAROL, json={"model_id": f"{session}:train:0"}).status_code == 404
    assert outcome(service, CAROL, create(limit + 1)) == (200, None)
    for seq in range(1, limit + 2):  # leave the service's adapters to the other tests
        if seq != limit:
            outcome(service, CAROL, post(service, "/api/v1/unload_model", CAROL,
                                         json={"model_id": f"{session}:train:{seq}"}))


@pytest.mark.parametrize("route", ["/api/v1/unload_model", "/api/v1/get_info"])
def test_another_tenant_cannot_unload_or_see_a_model(service, route):
    session, model_id = raw_model(service, CAROL)
    assert post(service, route, BOB, json={"model_id": model_id}).status_code == 404
    assert post(service, "/api/v1/get_info", CAROL, json={"model_id": model_id}).status_code == 200
    outcome(service, CAROL, post(service, "/api/v1/unload_model", CAROL, json={"model_id": model_id}))
