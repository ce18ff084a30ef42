"""Weights out of the service with the real SDK: save_weights_external, its signed URLs, encryption, expiry,
deletion, publishing to other tenants, weights_info and copy_weights."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pyrage
import pytest
import tinker
import torch
from conftest import ALICE, BOB
from safetensors.torch import load_file, load
from test_service import client, datum, post, tokens  # noqa: F401 (tokens is a fixture)
from test_service_rest import rest
from tinker import types

from colo.service.errors import Forbidden
from colo.service.signed_urls import UrlSigner


@pytest.fixture(scope="module")
def run(service, tokens):
    """A model of tenant alice trained one step with the SDK's defaults but the rank (the service's limit is 16)."""
    tc = client(service, ALICE).create_lora_training_client(base_model=service.model_name, rank=8).result()
    tc.forward_backward([datum(tokens("weights out of the service"))], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return tc


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url) as r:  # as tinker_cookbook.weights.download fetches: no API key
        return r.read()


def status_of(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url) as r:
            return r.status, ""
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["detail"]


def changed(url: str, **query) -> str:
    parts = urlsplit(url)
    q = {k: v[0] for k, v in parse_qs(parts.query).items()} | query
    return urlunsplit(parts._replace(query=urlencode(q)))


def test_an_export_is_a_peft_adapter_fetched_through_signed_urls(service, run):
    path = run.save_weights_external("final", ttl_seconds=7200).result().path
    assert path == f"tinker://{run.model_id}/external_weights/final"
    r = rest(service)
    got = r.get_external_weights_urls(path).result()
    assert sorted(got.urls) == ["adapter_config.json", "adapter_model.safetensors"]
    assert 3000 < (got.expires - datetime.now(timezone.utc)).total_seconds() <= 3600
    tensors = load(fetch(got.urls["adapter_model.safetensors"]))
    config = json.loads(fetch(got.urls["adapter_config.json"]))
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    # PEFT's key names, the output layer's included (the SDK's train_unembed=True)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert "base_model.model.lm_head.lora_B.weight" in tensors
    # the trained weights: B moved from its zero start
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in tensors.items())

    listed = {c.checkpoint_id: c for c in r.list_checkpoints(run.model_id).result().checkpoints}
    c = listed["external_weights/final"]
    assert c.checkpoint_type == "external" and c.tinker_path == path and c.size_bytes > 0
    assert 7000 < (c.expires_at - datetime.now(timezone.utc)).total_seconds() <= 7200

    # the cookbook renews the ttl each time it signs URLs: the same route as any checkpoint
    r.set_checkpoint_ttl_from_tinker_path(path, 3600).result()
    c = {c.checkpoint_id: c for c in r.list_checkpoints(run.model_id).result().checkpoints}["external_weights/final"]
    assert (c.expires_at - datetime.now(timezone.utc)).total_seconds() <= 3600


def test_a_changed_expired_or_foreign_url_is_refused(service, run):
    path = run.save_weights_external("guarded").result().path
    url = rest(service).get_external_weights_urls(path).result().urls["adapter_config.json"]
    assert status_of(url)[0] == 200
    q = parse_qs(urlsplit(url).query)
    expires, signature = q["expires"][0], q["signature"][0]

    later = changed(url, expires=str(int(expires) + 3600))  # a longer life, with the old signature
    assert status_of(later) == (403, status_of(later)[1]) and "signature does not match" in status_of(later)[1]
    forged = changed(url, signature="0" * 64)
    assert status_of(forged)[0] == 403
    unsigned = url.split("?")[0]
    assert status_of(unsigned)[0] == 403 and "not signed" in status_of(unsigned)[1]
    # another file, another export, another tenant's folder, a way out of the folder: the signature covers the path
    for old, new in [("adapter_config.json", "adapter_model.safetensors"), ("/guarded/", "/final/"),
                     ("/alice/alice/", "/alice/bob/"), ("adapter_config.json", "..%2F..%2Fweights")]:
        assert status_of(url.replace(old, new))[0] in (403, 404), new
    traversal = url.split("/api/v1/")[0] + "/api/v1/external_weights_files/alice/alice/../../../etc/passwd?" + \
        urlsplit(url).query
    assert status_of(traversal)[0] in (403, 404)

    # another tenant cannot ask for URLs of an export it was not given
    with pytest.raises(tinker.NotFoundError):
        rest(service, BOB).get_external_weights_urls(path).result()
    # and the service's own check refuses a URL past its expiry
    signer = UrlSigner(b"k" * 32, seconds=60)
    signed, until = signer.sign("http://x", "/p", now=1000.0)
    q = parse_qs(urlsplit(signed).query)
    signer.check("/p", q["expires"][0], q["signature"][0], now=1059.0)
    with pytest.raises(Forbidden, match="expired"):
        signer.check("/p", q["expires"][0], q["signature"][0], now=1060.0)


def test_an_encrypted_export_decrypts_to_the_plain_one(service, run, tmp_path):
    identity = pyrage.x25519.Identity.generate()
    plain = rest(service).get_external_weights_urls(run.save_weights_external("plain").result().path).result()
    path = run.save_weights_external("sealed", age_encryption_recipients=[str(identity.to_public())]).result().path
    sealed = rest(service).get_external_weights_urls(path).result()
    assert sorted(sealed.urls) == ["adapter_config.json.age", "adapter_model.safetensors.age"]
    for name, url in sealed.urls.items():
        data = fetch(url)
        assert b"lora_A" not in data  # no tensor name, no weight, in the clear
        assert pyrage.decrypt(data, [identity]) == fetch(plain.urls[name.removesuffix(".age")])
    # weights_info cannot read an encrypted export's configuration, and says so
    with pytest.raises(tinker.BadRequestError, match="encrypted"):
        rest(service).get_weights_info_by_tinker_path(path).result()


def test_bad_recipients_are_refused_before_anything_is_written(service, run):
    r = rest(service)
    before = [c.checkpoint_id for c in r.list_checkpoints(run.model_id).result().checkpoints]
    for bad, why in [(["age1notakey"], "age_encryption_recipients\\[0\\]"), (["ssh-ed25519 AAAA"], "SSH public key"),
                     ([str(pyrage.x25519.Identity.generate().to_public())] * 11, "at most 10")]:
        with pytest.raises(tinker.BadRequestError, match=why):
            run.save_weights_external("never", age_encryption_recipients=bad).result()
    with pytest.raises(tinker.BadRequestError, match="checkpoint name"):
        run.save_weights_external("../escape").result()
    assert [c.checkpoint_id for c in r.list_checkpoints(run.model_id).result().checkpoints] == before


def test_deleting_an_export_deletes_its_files(service, run):
    path = run.save_weights_external("short-lived").result().path
    urls = rest(service).get_external_weights_urls(path).result().urls
    folder = service.checkpoint_dir / "alice" / run.model_id / "external_weights" / "short-lived.external"
    assert sorted(p.name for p in folder.iterdir()) == sorted(urls)
    rest(service).delete_checkpoint_from_tinker_path(path).result()
    assert not folder.exists()
    assert all(status_of(u)[0] == 404 for u in urls.values())
    with pytest.raises(tinker.NotFoundError):
        rest(service).get_external_weights_urls(path).result()


def test_a_published_checkpoint_is_readable_by_other_tenants_and_only_while_published(service, run):
    export = run.save_weights_external("shared").result().path
    state = run.save_state("shared-state").result().path
    alice, bob = rest(service), rest(service, BOB)
    for p in (export, state):
        with pytest.raises(tinker.NotFoundError):
            bob.get_weights_info_by_tinker_path(p).result()

    alice.publish_checkpoint_from_tinker_path(export).result()
    alice.publish_checkpoint_from_tinker_path(state).result()
    assert {c.checkpoint_id: c.public for c in alice.list_checkpoints(run.model_id).result().checkpoints}[
        "external_weights/shared"] is True
    url = bob.get_external_weights_urls(export).result().urls["adapter_config.json"]
    assert json.loads(fetch(url))["r"] == 8
    info = bob.get_weights_info_by_tinker_path(state).result()
    assert (info.lora_rank, info.is_lora, info.train_unembed) == (8, True, True)
    # bob trains on from it, in a run of his own; alice's checkpoint stays hers
    tc = client(service, BOB).create_training_client_from_state(state).result()
    assert tc.get_info().lora_rank == 8
    with pytest.raises(tinker.NotFoundError):
        bob.delete_checkpoint_from_tinker_path(state).result()
    with pytest.raises(tinker.NotFoundError):
        bob.unpublish_checkpoint_from_tinker_path(state).result()

    alice.unpublish_checkpoint_from_tinker_path(export).result()
    code, detail = status_of(url)
    assert code == 403 and "no longer published" in detail
    with pytest.raises(tinker.NotFoundError):
        bob.get_external_weights_urls(export).result()


def test_weights_info_and_copy_weights(service, run):
    state = run.save_state("to-copy").result().path
    r = rest(service)
    info = r.get_weights_info_by_tinker_path(state).result()
    assert (info.base_model, info.lora_rank, info.train_attn, info.train_mlp, info.train_unembed) == (
        service.model_name, 8, True, True, True)
    copy = r.copy_weights(state, "archive", ttl_seconds=3600).result()
    assert copy.startswith("tinker://copy-") and copy.endswith("/weights/to-copy")
    listed = r.list_checkpoints(tinker.ParsedCheckpointTinkerPath.from_tinker_path(copy).training_run_id).result()
    assert [c.checkpoint_id for c in listed.checkpoints] == ["weights/to-copy"]
    assert listed.checkpoints[0].expires_at is not None
    # the copy outlives its source, and loads as the source did
    r.delete_checkpoint_from_tinker_path(state).result()
    tc = client(service, ALICE).create_training_client_from_state_with_optimizer(copy).result()
    assert tc.get_info().lora_rank == 8
    # ServiceClient.copy_weights copies into its own project (colo keeps no projects: a run of the tenant)
    again = tinker.ServiceClient(base_url=service.url, api_key=ALICE, project_id="archive").copy_weights(copy).result()
    assert again.startswith("tinker://copy-") and again != copy
    with pytest.raises(tinker.NotFoundError):
        rest(service, BOB).copy_weights(copy, "mine").result()
    with pytest.raises(tinker.BadRequestError, match="weights_access_token"):
        r.copy_weights(copy, "archive", weights_access_token="tok").result()
    # the SDK sends a retry with the same idempotency key: one copy
    body = {"source_path": copy, "destination_project_id": "archive"}
    answers = [post(service, "/api/v1/copy_weights", json=body, headers={"X-Idempotency-Key": "k1"}).json()
               for _ in range(2)]
    assert answers[0] == answers[1] and answers[0]["tinker_path"].startswith("tinker://copy-")
