"""The SDK's REST side against the real service: training runs, checkpoint listing, deletion and expiry,
sessions that finish, and a clear answer for what colo does not serve."""

from __future__ import annotations

import time

import httpx
import pytest
import tinker
from conftest import ALICE, BOB
from test_service import SESSION, client, datum, post, tokens  # noqa: F401 (tokens is a fixture)
from tinker import types


def rest(service, key: str = ALICE) -> tinker.RestClient:
    return tinker.RestClient(base_url=service.url, api_key=key)


def trained(service, tokens, key: str = ALICE):
    tc = client(service, key).create_lora_training_client(base_model=service.model_name, rank=8,
                                                          train_unembed=False).result()
    tc.forward_backward([datum(tokens("runs and checkpoints"))], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return tc


def test_training_runs_and_their_checkpoints_are_listed_and_deleted(service, tokens):
    tc = trained(service, tokens)
    first = tc.save_state("first").result().path
    second = tc.save_state("second").result().path
    sampler = tc.save_weights_for_sampler("for-sampling").result().path
    r = rest(service)

    run = r.get_training_run(tc.model_id).result()
    assert (run.training_run_id, run.is_lora, run.lora_rank, run.model_owner) == (tc.model_id, True, 8, "alice")
    assert run.last_checkpoint.tinker_path == second
    assert run.last_sampler_checkpoint.tinker_path == sampler
    assert r.get_training_run_by_tinker_path(first).result().training_run_id == tc.model_id
    assert tc.model_id in [x.training_run_id for x in r.list_training_runs(limit=100).result().training_runs]

    listed = r.list_checkpoints(tc.model_id).result().checkpoints
    assert [(c.checkpoint_id, c.checkpoint_type) for c in listed] == [
        ("weights/first", "training"), ("weights/second", "training"), ("sampler_weights/for-sampling", "sampler")]
    assert all(c.size_bytes > 0 and c.expires_at is None for c in listed)
    assert first in [c.tinker_path for c in r.list_user_checkpoints(limit=100).result().checkpoints]

    r.delete_checkpoint_from_tinker_path(first).result()
    assert [c.checkpoint_id for c in r.list_checkpoints(tc.model_id).result().checkpoints] == [
        "weights/second", "sampler_weights/for-sampling"]
    with pytest.raises(tinker.NotFoundError):
        r.delete_checkpoint_from_tinker_path(first).result()
    # another tenant sees none of it
    with pytest.raises(tinker.NotFoundError):
        rest(service, BOB).get_training_run(tc.model_id).result()
    with pytest.raises(tinker.NotFoundError):
        rest(service, BOB).delete_checkpoint_from_tinker_path(second).result()
    assert r.list_checkpoints(tc.model_id).result().checkpoints[0].checkpoint_id == "weights/second"
    # the run stays readable from its checkpoints once its model is gone (a resume after a restart)
    assert post(service, "/api/v1/unload_model", json={"model_id": tc.model_id}).status_code == 200
    time.sleep(0.5)
    run = r.get_training_run(tc.model_id).result()
    assert run.lora_rank == 8 and run.last_checkpoint.tinker_path == second


def test_ttl_seconds_expires_a_checkpoint_and_set_ttl_changes_it(service, tokens):
    tc = trained(service, tokens)
    r = rest(service)
    tc.save_state("short-lived", ttl_seconds=1).result()  # Tinker allows an hour at least; colo a second
    kept = tc.save_state("kept").result().path
    listed = {c.checkpoint_id: c for c in r.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed["weights/short-lived"].expires_at is not None and listed["weights/kept"].expires_at is None
    r.set_checkpoint_ttl_from_tinker_path(kept, 3600).result()
    assert r.list_checkpoints(tc.model_id).result().checkpoints[-1].expires_at is not None
    time.sleep(1.5)
    tc.save_state("later").result()  # a save deletes what has expired
    names = [c.checkpoint_id for c in r.list_checkpoints(tc.model_id).result().checkpoints]
    assert names == ["weights/kept", "weights/later"]
    bad = httpx.put(f"{service.url}/api/v1/training_runs/{tc.model_id}/checkpoints/weights/kept/ttl",
                    headers={"X-API-Key": ALICE}, json={"ttl_seconds": -5})
    assert bad.status_code == 400 and "ttl_seconds=-5; allowed" in bad.json()["detail"]


def test_a_finished_session_frees_its_models_and_stops_its_heartbeat(service, tokens):
    with client(service) as sc:
        tc = sc.create_lora_training_client(base_model=service.model_name, rank=8, train_unembed=False).result()
        tc.forward_backward([datum(tokens("a session that ends"))], "cross_entropy").result()
        session_id = tc.model_id.split(":")[0]
        assert tc.model_id in rest(service).get_session(session_id).result().training_run_ids
    # the block's exit finished the session (it used to answer 404 and fail the script)
    r = post(service, "/api/v1/session_heartbeat", json={"session_id": session_id, "type": "session_heartbeat"})
    assert r.status_code == 410, r.text
    assert post(service, "/api/v1/get_info", json={"model_id": tc.model_id}).status_code == 404


def test_what_colo_does_not_serve_gets_a_clear_4xx(service, tokens):
    tc = trained(service, tokens)
    path = tc.save_state("unpublished").result().path
    with pytest.raises(tinker.NotFoundError, match="not served by colo"):
        rest(service).publish_checkpoint_from_tinker_path(path).result()
    r = post(service, "/api/v1/no_such_thing", json={})
    assert r.status_code == 404 and "POST /api/v1/no_such_thing is not served by colo" in r.json()["detail"]
