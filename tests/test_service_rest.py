"""The SDK's REST side against the real service: training runs, checkpoint listing, deletion and expiry,
sessions that finish, and a clear answer for what colo does not serve."""

from __future__ import annotations

import time
from types import SimpleNamespace

import httpx
import numpy as np
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


def test_what_colo_does_not_serve_gets_a_clear_4xx(service):
    r = post(service, "/api/v1/no_such_thing", json={})
    assert r.status_code == 404 and "POST /api/v1/no_such_thing is not served by colo" in r.json()["detail"]


def rl_datum(prompt: list[int], seq, advantage: float, sampler_logprobs: list[float]) -> types.Datum:
    """A cookbook-shaped RL datum with provenance: prompt, then the sampled tokens."""
    tokens = prompt + list(seq.tokens)
    n = len(tokens) - 1
    p = len(prompt)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                        "logprobs": np.array([0.0] * (p - 1) + sampler_logprobs, dtype=np.float32),
                        "advantages": np.array([0.0] * (p - 1) + [advantage] * (n - p + 1), dtype=np.float32)})
    return datum.with_provenance(
        model_input=[types.PromptProvenanceSpan(sequence_id=seq.sequence_id, length=p),
                     types.SampledProvenanceSpan(sequence_id=seq.sequence_id, length=len(seq.tokens) - 1)],
        loss_fn_inputs=[types.PromptProvenanceSpan(sequence_id=seq.sequence_id, offset=1, length=p - 1),
                        types.SampledProvenanceSpan(sequence_id=seq.sequence_id, length=len(seq.tokens))])


def test_stable_reinforce_trains_on_recorded_sequences_with_the_recorded_logprobs(service, tokens):
    tc = client(service).create_lora_training_client(base_model=service.model_name, rank=8,
                                                     train_unembed=False).result()
    sampler = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    prompt = tokens("one plus two answer")
    out = sampler.sample(types.ModelInput.from_ints(prompt), 2, types.SamplingParams(max_tokens=5, seed=3)).result()
    seqs = out.sequences
    assert all(s.sequence_id for s in seqs) and len({s.sequence_id for s in seqs}) == 2
    # the client sends garbage sampler logprobs; colo weighs by what it recorded, so the loss is the
    # one computed from the true ones
    honest = [rl_datum(prompt, s, adv, list(s.logprobs)) for s, adv in zip(seqs, (1.0, -1.0))]
    lying = [rl_datum(prompt, s, adv, [-20.0] * len(s.tokens)) for s, adv in zip(seqs, (1.0, -1.0))]
    a = tc.forward(honest, "stable_reinforce").result()
    b = tc.forward(lying, "stable_reinforce").result()
    assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=1e-6)
    # ... and that loss is stable_reinforce's on the recorded logprobs: weights exp(lp - q) = 1 here
    # (same weights, float32): loss = -sum A * lp over the sampled tokens
    expected = 0.0
    for datum, output in zip(honest, a.loss_fn_outputs):
        lp = output["logprobs"].to_numpy()
        adv = datum.loss_fn_inputs["advantages"].to_numpy()
        expected -= float((adv * lp).sum())
    assert a.metrics["loss:sum"] == pytest.approx(expected, rel=1e-3)
    # the stale-sampler alarm's figures: sampled by the version being trained, the same weights
    assert a.metrics["sampler_versions_behind:max"] == 0
    assert a.metrics["kl_sample_train_v2:mean"] < 1e-6
    # the two datums share their prompt, computed once
    assert a.metrics["tokens_computed:sum"] < a.metrics["tokens_unshared:sum"]
    tc.forward_backward(honest, "stable_reinforce").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    after = tc.forward(honest, "stable_reinforce").result()
    assert after.metrics["sampler_versions_behind:max"] == 1
    assert after.metrics["kl_sample_train_v2:mean"] > a.metrics["kl_sample_train_v2:mean"]


def test_stable_reinforce_refuses_what_was_not_recorded(service, tokens):
    tc = client(service).create_lora_training_client(base_model=service.model_name, rank=8,
                                                     train_unembed=False).result()
    prompt = tokens("one plus two answer")
    plain = tc.save_weights_and_get_sampling_client().result()  # not recording
    seq = plain.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=4, seed=1)).result()
    with pytest.raises(tinker.RequestFailedError, match="was not recorded"):
        tc.forward([rl_datum(prompt, seq.sequences[0], 1.0, list(seq.sequences[0].logprobs))],
                   "stable_reinforce").result()
    with pytest.raises(tinker.RequestFailedError, match="no loss_fn_input_spans"):
        tc.forward([datum(prompt + list(seq.sequences[0].tokens))], "stable_reinforce").result()
    recording = tc.save_weights_and_get_sampling_client(record_stability_info=True).result()
    rec = recording.sample(types.ModelInput.from_ints(prompt), 1, types.SamplingParams(max_tokens=4, seed=1)).result()
    forged = SimpleNamespace(sequence_id=rec.sequences[0].sequence_id, tokens=[t + 1 for t in rec.sequences[0].tokens])
    with pytest.raises(tinker.RequestFailedError, match="differ from sequence"):
        tc.forward([rl_datum(prompt, forged, 1.0, list(rec.sequences[0].logprobs))], "stable_reinforce").result()
    # another tenant cannot use alice's recorded sequence
    bob = client(service, BOB).create_lora_training_client(base_model=service.model_name, rank=8,
                                                           train_unembed=False).result()
    with pytest.raises(tinker.RequestFailedError, match="was not recorded"):
        bob.forward([rl_datum(prompt, rec.sequences[0], 1.0, list(rec.sequences[0].logprobs))],
                    "stable_reinforce").result()
