"""Session-side routes of tinker SDK 0.38 against the real service: the sampling clients' completion
queue (``retrieve_futures``), session search, projects and listing, who a key is, and the Tinker routes
colo refuses (each a 4xx that says why; ``refusals.py``)."""

from __future__ import annotations

import pickle
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import tinker
from conftest import ALICE, BOB
from test_service import datum, overfit, post, tokens  # noqa: F401 (tokens is a fixture)
from tinker import types
from tinker.cli.auth_api import TinkerAuthApi
from tinker.lib.api_future_impl import QueueState
from tinker.lib.internal_client_holder import InternalClientHolder

from colo.service.refusals import REFUSALS

# search_sessions is experimental in SDK 0.38 (it warns on every call)
pytestmark = pytest.mark.filterwarnings("ignore::tinker.lib.experimental.ExperimentalWarning")

PARAMS = types.SamplingParams(max_tokens=4, temperature=0.0)


def rest(service, key: str = ALICE) -> tinker.RestClient:
    return tinker.RestClient(base_url=service.url, api_key=key)


def base_sampler(service, key: str = ALICE, **session) -> tuple[tinker.ServiceClient, tinker.SamplingClient]:
    """A session (no model: cheap) and a sampling client of the base model in it."""
    sc = tinker.ServiceClient(base_url=service.url, api_key=key, **session)
    return sc, sc.create_sampling_client(base_model=service.model_name).result()


def retrieve_futures(service, session_id: str, key: str = ALICE, **body) -> httpx.Response:
    body.setdefault("target", {"type": "sampling_session", "sampling_session_id": session_id, "cloned_sampler_id": 0})
    return post(service, "/api/v1/retrieve_futures", key, json=body)


def asample(service, session_id: str, seq_id: int, prompt: list[int], key: str = ALICE) -> str:
    r = post(service, "/api/v1/asample", key, json={
        "sampling_session_id": session_id, "seq_id": seq_id, "num_samples": 1,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
        "sampling_params": {"max_tokens": 3, "temperature": 0.0}})
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


# ---- retrieve_futures ---------------------------------------------------------------------------------


def test_retrieve_futures_reports_each_request_once_per_cloned_client_with_a_cursor(service, tokens):
    _, sampler = base_sampler(service)
    sid = sampler._sampling_session_id
    prompt = tokens("the completion queue")
    # nothing yet: timeout 0 answers at once with the cursor passed in
    r = retrieve_futures(service, sid, timeout=0)
    assert r.status_code == 200 and r.json() == {"completions": [], "cursor": 0}

    a, b = asample(service, sid, 1, prompt), asample(service, sid, 2, prompt)
    clone = asample(service, sid, 7_000_000_001, prompt)  # cloned client 7: its own queue
    bad = asample(service, sid, 3, [10**9])  # a token outside the vocabulary: the job fails
    seen, cursor, deadline = {}, 0, time.monotonic() + 120
    while len(seen) < 3 and time.monotonic() < deadline:
        body = retrieve_futures(service, sid, prev_cursor=cursor).json()
        assert body["cursor"] >= cursor
        cursor = body["cursor"]
        for c in body["completions"]:
            assert c["request_id"] not in seen  # reported once: the cursor covers what was answered
            seen[c["request_id"]] = c["state"]
    assert seen == {a: "finished", b: "finished", bad: "failed"}
    # what the cursor covers is dropped; with no new completion a short poll waits, then answers empty
    start = time.monotonic()
    assert retrieve_futures(service, sid, prev_cursor=cursor, timeout=0.5).json() == {"completions": [],
                                                                                      "cursor": cursor}
    assert time.monotonic() - start >= 0.4
    # an old cursor gets nothing it covered again; the payloads are still fetched one at a time
    again = retrieve_futures(service, sid, prev_cursor=0, timeout=0).json()["completions"]
    assert {c["request_id"] for c in again} <= {a, b, bad}
    assert post(service, "/api/v1/retrieve_future", json={"request_id": a}).status_code == 200
    failed = post(service, "/api/v1/retrieve_future", json={"request_id": bad}).json()
    assert failed["category"] == "user" and "error" in failed
    # the clone's queue holds its own request only
    cloned = retrieve_futures(service, sid, target={"type": "sampling_session", "sampling_session_id": sid,
                                                    "cloned_sampler_id": 7}).json()
    assert [c["request_id"] for c in cloned["completions"]] == [clone]


def test_retrieve_futures_of_another_tenant_or_with_bad_values_is_refused(service):
    _, sampler = base_sampler(service)
    sid = sampler._sampling_session_id
    r = retrieve_futures(service, sid, BOB, timeout=0)
    assert r.status_code == 404 and "unknown sampling session" in r.json()["detail"]
    r = retrieve_futures(service, "no-such-session", timeout=0)
    assert r.status_code == 404
    r = retrieve_futures(service, sid, timeout=-1)
    assert r.status_code == 400 and "timeout >= 0" in r.json()["detail"]
    r = retrieve_futures(service, sid, prev_cursor=-3, timeout=0)
    assert r.status_code == 400 and "prev_cursor >= 0" in r.json()["detail"]
    r = retrieve_futures(service, sid, target={"type": "training_run", "model_id": "x"})
    assert r.status_code == 400


@pytest.fixture
def sdk_poller(monkeypatch):
    """The SDK as it runs when the server sets ``sample_use_retrieve_futures`` (whatever colo's default)."""
    real = InternalClientHolder.get_client_config

    def with_poller(self):
        return real(self).model_copy(update={"sample_use_retrieve_futures": True})

    monkeypatch.setattr(InternalClientHolder, "get_client_config", with_poller)


def test_the_sdks_session_poller_samples_many_at_once_and_reports_failures(service, tokens, sdk_poller):
    _, sampler = base_sampler(service)
    prompt = types.ModelInput.from_ints(tokens("many samples share one poll"))
    futures = [sampler.sample(prompt, 1, PARAMS) for _ in range(6)]
    outs = [f.result(timeout=120) for f in futures]
    assert sampler._futures_poller is not None  # the poller, not retrieve_future per request, waited
    assert len({tuple(o.sequences[0].tokens) for o in outs}) == 1 and len(outs[0].sequences[0].tokens) == 4
    lp = sampler.compute_logprobs(prompt).result(timeout=120)
    assert lp[0] is None and len(lp) == len(prompt.to_ints())
    with pytest.raises(tinker.RequestFailedError):
        sampler.sample(types.ModelInput.from_ints([10**9]), 1, PARAMS).result(timeout=120)
    # a clone in another thread (unpickled: its own cloned_sampler_id, its own queue) samples too
    clone = pickle.loads(pickle.dumps(sampler))
    with ThreadPoolExecutor(1) as pool:
        out = pool.submit(lambda: clone.sample(prompt, 1, PARAMS).result(timeout=120)).result()
    assert list(out.sequences[0].tokens) == list(outs[0].sequences[0].tokens)


def test_client_config_flags_the_sdk_reads(service):
    config = post(service, "/api/v1/client/config", json={}).json()
    parsed = types.ClientConfigResponse.model_validate(config)
    assert parsed.pjwt_auth_enabled is False  # colo checks keys itself: no /auth/token exchange
    assert parsed.sample_use_retrieve_futures is True  # every SamplingClient waits on retrieve_futures


# ---- sessions -----------------------------------------------------------------------------------------


def test_search_sessions_filters_pages_and_shows_how_a_session_ended(service, tokens):
    tag = f"search-{time.monotonic_ns()}"
    sc1, s1 = base_sampler(service, user_metadata={"tag": tag, "kind": "sft"}, display_name=f"Nightly {tag} one")
    sc2, s2 = base_sampler(service, user_metadata={"tag": tag, "kind": "rl"}, display_name=f"nightly {tag} two",
                           project_id="research")
    sc3, s3 = base_sampler(service, user_metadata={"tag": tag, "kind": "rl"})
    ids = [sc.holder.get_session_id() for sc in (sc1, sc2, sc3)]
    r = rest(service)

    def search(**kw) -> types.SessionSearchResponse:
        return r.search_sessions(types.SessionSearchRequest(user_metadata={"tag": tag, **kw.pop("meta", {})},
                                                            **kw)).result()

    page = search()
    assert [s.session_id for s in page.sessions] == ids[::-1] and page.next_cursor is None  # newest first
    top = page.sessions[1]
    assert (top.owner, top.project_id, top.display_name, top.user_metadata) == (
        "alice", "research", f"nightly {tag} two", {"tag": tag, "kind": "rl"})
    assert top.status.type == "active" and top.checkpoints_count == 0
    assert page.sessions[2].project_id == "default"
    # every pair of user_metadata, each word of display_name (any case), session_id or display_name
    assert [s.session_id for s in search(meta={"kind": "rl"}).sessions] == [ids[2], ids[1]]
    assert [s.session_id for s in search(display_name=f"{tag.upper()} NIGHTLY").sessions] == [ids[1], ids[0]]
    assert [s.session_id for s in search(display_name="one", session_id=ids[2]).sessions] == [ids[2], ids[0]]
    assert [s.session_id for s in search(project_ids=["research"]).sessions] == [ids[1]]
    # pages of one, by the cursor
    got, cursor = [], None
    while True:
        p = search(limit=1, cursor=cursor)
        got += [s.session_id for s in p.sessions]
        if (cursor := p.next_cursor) is None:
            break
    assert got == ids[::-1]
    # a finished session says how; statuses filter on it
    sc1.close("errored", detail="diverged").result()
    s = search(session_id=ids[0]).sessions[0]
    assert s.status.type == "client_finished" and s.status.reason.type == "errored" and s.status.detail == "diverged"
    assert [x.session_id for x in search(statuses=[types.ClientFinishedSessionStatusQuery(reasons=["errored"])]).sessions] == [ids[0]]
    assert [x.session_id for x in search(statuses=[types.ActiveSessionStatusQuery()]).sessions] == [ids[2], ids[1]]
    assert search(statuses=[types.FailedSessionStatusQuery()]).sessions == []  # colo fails no session
    # owners: another tenant sees none of it; "accessible" is the tenant's own; "user" names the tenant
    assert rest(service, BOB).search_sessions(types.SessionSearchRequest(user_metadata={"tag": tag})).result().sessions == []
    assert len(search(owner=types.AccessibleSearchOwner()).sessions) == 3
    assert len(search(owner=types.UserSearchOwner(owner_urns=["alice"])).sessions) == 3
    assert search(owner=types.UserSearchOwner(owner_urns=["bob"])).sessions == []
    bad = post(service, "/api/v1/sessions/search", json={"limit": 0})
    assert bad.status_code == 400 and "limit" in bad.json()["detail"]


def test_search_counts_a_sessions_checkpoints(service, tokens):
    tag = f"ckpt-{time.monotonic_ns()}"
    sc = tinker.ServiceClient(base_url=service.url, api_key=ALICE, user_metadata={"tag": tag})
    tc = sc.create_lora_training_client(base_model=service.model_name, rank=8, train_unembed=False).result()
    tc.save_state("one").result()
    tc.save_weights_for_sampler("two").result()
    s = rest(service).search_sessions(types.SessionSearchRequest(user_metadata={"tag": tag})).result().sessions[0]
    assert s.checkpoints_count == 2 and s.checkpoint_storage_bytes > 0


def test_get_list_and_assign_project_of_sessions(service):
    sc, sampler = base_sampler(service, user_metadata={"k": "v"}, display_name="named")
    sid = sc.holder.get_session_id()
    r = rest(service)
    got = r.get_session(sid).result()
    assert got.sampler_ids == [sampler._sampling_session_id] and got.training_run_ids == []
    assert (got.user_metadata, got.display_name) == ({"k": "v"}, "named")
    assert r.list_sessions(limit=1).result().sessions == [sid]  # newest first
    assert sid in r.list_sessions(limit=1000, access_scope="accessible").result().sessions
    assert sid not in rest(service, BOB).list_sessions(limit=1000).result().sessions
    r.assign_session_project(sid, "moved").result()
    found = r.search_sessions(types.SessionSearchRequest(session_id=sid)).result().sessions
    assert found[0].project_id == "moved"
    with pytest.raises(tinker.NotFoundError):
        rest(service, BOB).assign_session_project(sid, "stolen").result()
    with pytest.raises(tinker.BadRequestError, match="project_id"):
        r.assign_session_project(sid, "").result()
    with pytest.raises(tinker.BadRequestError, match="limit"):
        r.list_sessions(limit=0).result()


# ---- the rest of the clients' surface that no other test file calls ----------------------------------


def test_load_state_without_optimizer_delete_checkpoint_by_id_and_get_sampler(service, tokens):
    sc = tinker.ServiceClient(base_url=service.url, api_key=ALICE)
    tc = sc.create_lora_training_client(base_model=service.model_name, rank=8, train_unembed=False).result()
    seq = tokens("weights only this time")
    overfit(tc, seq, steps=2)
    path = tc.save_state("weights-only").result().path
    saved = tc.forward([datum(seq)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    overfit(tc, seq, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in SDK 0.38, still served
        tc.load_state(path).result()
    back = tc.forward([datum(seq)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    assert abs(back - saved).max() < 1e-6
    fresh = sc.create_training_client_from_state(path).result()
    assert fresh.model_id != tc.model_id and fresh.get_info().lora_rank == 8
    loaded = fresh.forward([datum(seq)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    assert abs(loaded - saved).max() < 1e-6

    assert tc.get_console_url().startswith("http") and tc.model_id in tc.get_console_url()  # Tinker's console
    tc.get_telemetry()
    r = rest(service)
    sampler = tc.save_weights_and_get_sampling_client().result()
    got = r.get_sampler(sampler._sampling_session_id).result()
    assert got.sampler_id == sampler._sampling_session_id and got.base_model == service.model_name
    with pytest.raises(tinker.NotFoundError):
        rest(service, BOB).get_sampler(sampler._sampling_session_id).result()
    r.delete_checkpoint(tc.model_id, "weights/weights-only").result()
    assert "weights/weights-only" not in [c.checkpoint_id for c in r.list_checkpoints(tc.model_id).result().checkpoints]


def test_client_side_helpers_and_capabilities(service, tokens, monkeypatch):
    sc, sampler = base_sampler(service)
    # a handle carries no key (it is for another process, which has its own environment)
    monkeypatch.setenv("TINKER_API_KEY", ALICE)
    monkeypatch.setenv("TINKER_BASE_URL", service.url)
    prompt = types.ModelInput.from_ints(tokens("helpers on the client"))
    want = sampler.sample(prompt, 1, PARAMS).result().sequences[0].tokens
    # a handle rebuilds the client elsewhere (no pickle); SamplingClient.create makes one from a holder
    again = tinker.SamplingClient.from_sampler_handle(sampler.get_sampler_handle())
    assert again.sample(prompt, 1, PARAMS).result().sequences[0].tokens == want
    made = tinker.SamplingClient.create(sc.holder, base_model=service.model_name).result()
    assert made.sample(prompt, 1, PARAMS).result().sequences[0].tokens == want
    assert sampler.get_base_model() == service.model_name
    assert sampler.get_tokenizer().encode("helpers on the client") == prompt.to_ints()
    sampler.on_queue_state_change(QueueState.PAUSED_CAPACITY, "busy")  # the SDK's hook: logs, raises nothing
    # the console and telemetry are Tinker's: the URLs point at its console, telemetry posts are dropped
    assert sc.get_console_url().startswith("http")
    for c in (sc, sampler, rest(service)):
        c.get_telemetry()
    names = [m.model_name for m in rest(service).get_server_capabilities().result().supported_models]
    assert service.model_name in names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # both deprecated in SDK 0.38
        assert service.model_name in [m.model_name for m in sc.get_server_capabilities().supported_models]
        assert sc.create_rest_client().get_session(sc.holder.get_session_id()).result().sampler_ids


# ---- who is asking, and what is refused ---------------------------------------------------------------


def test_api_key_me_names_the_tenant_for_tinker_auth_login(service):
    with httpx.Client(timeout=30) as http:
        me = TinkerAuthApi(http, base_url=service.url).get_self_api_key(ALICE)
    assert me.name == "alice" and me.details.org_details.name == "colo" and ALICE not in me.model_dump_json()
    r = httpx.get(service.url + "/api/v1/auth/apikey/me", headers={"X-API-Key": "wrong"})
    assert r.status_code == 401


def test_whoami_says_it_needs_jwt_auth_which_colo_does_not_use(service):
    with pytest.raises(RuntimeError, match="whoami requires JWT auth"):
        rest(service).whoami().result()


def refused(path: str) -> str:
    return next(x for x in REFUSALS if x.path == path).why


@pytest.mark.parametrize("call, path", [
    (lambda r: r.get_billing_usage("2025-01-01T00:00:00Z", "2025-01-02T00:00:00Z"), "/api/v1/billing/usage/events"),
    (lambda r: r.get_current_checkpoint_storage_usage(), "/api/v1/billing/usage/checkpoints/current"),
    (lambda r: r.get_audit_log(), "/api/v1/audit"),
    (lambda r: r.export_session_trace("any-session"), "/api/v1/sessions/{session_id}/trace_export"),
])
def test_refused_sdk_calls_raise_at_once_with_the_reason(service, call, path):
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the RestClient billing and audit calls are deprecated
        future = call(rest(service))
    with pytest.raises(tinker.PermissionDeniedError) as e:
        future.result(timeout=60)
    assert refused(path) in str(e.value) and "is not served by colo" in str(e.value)
    assert time.monotonic() - start < 10  # not retried


def test_every_refusal_answers_403_with_what_and_why_and_unknown_paths_404(service):
    for x in REFUSALS:
        r = httpx.request(x.method, service.url + x.path.replace("{session_id}", "s1"), headers={"X-API-Key": ALICE})
        assert r.status_code == 403 and x.what in r.json()["detail"] and x.why in r.json()["detail"], r.text
        assert httpx.request(x.method, service.url + x.path.replace("{session_id}", "s1")).status_code == 401
    r = post(service, "/api/v1/no_such_thing", json={})
    assert r.status_code == 404 and "not a route of the Tinker API" in r.json()["detail"]
    assert "/api/v1/audit" not in r.json()["detail"]  # the served list names no refused route


def test_server_capabilities_list_what_the_service_takes(service):
    import typing

    caps = httpx.get(service.url + "/api/v1/get_server_capabilities", headers={"X-API-Key": ALICE}, timeout=30).json()
    assert [m["model_name"] for m in caps["supported_models"]] == [service.model_name]
    # every loss the SDK names (its LossFnType), and nothing else
    assert caps["losses"] == sorted(typing.get_args(types.LossFnType))
    assert caps["lora"]["max_rank"] == 16 and caps["lora"]["train_unembed"] is True
    assert caps["checkpoints"]["kinds"] == ["weights", "sampler_weights", "external_weights"]
    for route in ("POST /api/v1/save_weights_external", "POST /api/v1/create_custom_loss",
                  "POST /api/v1/retrieve_futures", "POST /api/v1/sessions/search"):
        assert route in caps["routes"]
    assert any(r.startswith("GET /api/v1/billing/usage/events: billing usage") for r in caps["refused"])
    # the SDK reads it as its own type; the rest rides along
    typed = tinker.ServiceClient(base_url=service.url, api_key=ALICE).get_server_capabilities()
    assert typed.supported_models[0].max_context_length == caps["supported_models"][0]["max_context_length"]
