"""Trained weights out of the service, as ``tinker_cookbook.weights.download`` fetches them.

``save_weights_external`` writes the model's adapter, in its request order, as a plain PEFT directory
(``adapter_model.safetensors`` with PEFT's key names, ``base_model.model.<module>.lora_A.weight``, and
``adapter_config.json``): what the cookbook's ``build_lora_adapter`` and ``build_hf_model`` read, and
what ``peft`` and ``vllm serve --lora-modules`` load as it is. With ``age_encryption_recipients`` each
file is encrypted to them and stored as ``<file>.age``, streamed through ``pyrage`` (never whole in
memory); the service keeps no key that could decrypt it.

``external_weights_urls`` answers one signed URL per file (``signed_urls``), served by this service on
its own port; a download checks the signature before it touches the disk, names only files the export
holds, and streams the file.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

from tinker import types as tt

from colo.errors import InvalidRequestError
from colo.service.checkpoint_store import PUBLIC, CheckpointStore
from colo.service.checkpoints import Checkpoints
from colo.service.errors import Forbidden, NotFound
from colo.service.futures import Encode
from colo.service.models import Model, Models
from colo.service.signed_urls import UrlSigner
from colo.trainer import Trainer

KIND = "external_weights"
AGE = ".age"
MAX_RECIPIENTS = 10  # as the SDK documents
DOWNLOAD_PREFIX = "/api/v1/external_weights_files"
_FILE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_TENANT = re.compile(r"[A-Za-z0-9_-]{1,64}")


def recipients(keys: list[str] | None) -> list:
    """The request's age recipients, parsed before any job is queued (a bad one changes nothing)."""
    import pyrage

    if not keys:
        return []
    if len(keys) > MAX_RECIPIENTS:
        raise InvalidRequestError(f"{len(keys)} age_encryption_recipients; allowed: at most {MAX_RECIPIENTS}")
    out = []
    for i, key in enumerate(keys):
        kind = pyrage.x25519 if key.startswith("age1") else pyrage.ssh
        try:
            out.append(kind.Recipient.from_str(key))
        except pyrage.RecipientError as e:
            raise InvalidRequestError(f"age_encryption_recipients[{i}] {key[:24]!r}...: {e}; allowed: a native age "
                                      "public key (age1...) or an SSH public key (ssh-ed25519 or ssh-rsa ...)") from None
    return out


def write(trainer: Trainer, adapter: str, target: Path, to: list) -> None:
    """Export ``adapter`` into the folder ``target``, encrypted to ``to`` if any; swapped in whole, so a
    reader sees the previous export or this one, never a mix."""
    import pyrage

    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    try:
        plain = Path(trainer.export_adapter(adapter, tmp / "plain"))
        for f in sorted(plain.iterdir()):
            if to:
                pyrage.encrypt_file(str(f), str(tmp / (f.name + AGE)), to)
                f.unlink()
            else:
                f.rename(tmp / f.name)
        plain.rmdir()
        if target.exists():
            CheckpointStore.delete(target)  # a save under the same name replaces it
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ExternalWeights:
    def __init__(self, models: Models, checkpoints: Checkpoints, signer: UrlSigner | None = None) -> None:
        self._models, self._checkpoints = models, checkpoints
        self._store = checkpoints.store
        self._signer = signer or UrlSigner()

    def save(self, tenant: str, req: tt.SaveWeightsExternalRequest, encode: Encode) -> dict:
        """A training-client job in the model's order; its result is the export's path and size."""
        model_id = self._models.get(tenant, req.model_id).model_id
        target = self._store.file(tenant, model_id, KIND, req.path)
        ttl = CheckpointStore.checked_ttl(req.ttl_seconds)
        to = recipients(req.age_encryption_recipients)

        def run(trainer: Trainer, model: Model) -> tt.SaveWeightsExternalResponseInternal:
            self._checkpoints.write(trainer, target, ttl, lambda: write(trainer, model.adapter, target, to))
            size = sum(f.stat().st_size for f in target.iterdir())
            return tt.SaveWeightsExternalResponseInternal(path=CheckpointStore.tinker_path(model_id, KIND, req.path),
                                                          size_bytes=size, type="save_weights_external")

        return self._models.ordered(tenant, model_id, req.seq_id, run, encode)

    def urls(self, tenant: str, model_id: str, kind: str, name: str, base_url: str) -> tt.ExternalWeightsUrlsResponse:
        """One signed URL per file of the export (the tenant's own, or one another tenant published)."""
        if kind != KIND:
            raise InvalidRequestError(f"checkpoint {kind}/{name}: signed URLs are for external weights only; "
                                      f"allowed: {KIND}/<name> (from save_weights_external)")
        c = self._store.locate(tenant, CheckpointStore.tinker_path(model_id, kind, name), (KIND,))
        urls, expires = {}, 0
        for f in sorted(p for p in c.file.iterdir() if p.is_file()):
            urls[f.name], expires = self._signer.sign(base_url, self._path(tenant, c.owner, model_id, name, f.name))
        return tt.ExternalWeightsUrlsResponse(urls=urls, expires=datetime.fromtimestamp(expires, tz=timezone.utc))

    def open(self, reader: str, owner: str, model_id: str, name: str, file: str, expires: str | None,
             signature: str | None) -> Path:
        """The file a signed URL names; ``Forbidden`` for any URL this service did not sign as it is. A URL
        signed for another tenant than the owner reads only while the export stays published."""
        self._signer.check(self._path(reader, owner, model_id, name, file), expires, signature)
        # signed, so these are names this service wrote; checked again before they touch the disk
        if not _FILE.fullmatch(file) or not all(_TENANT.fullmatch(t) for t in (reader, owner)):
            raise Forbidden(f"file {file!r}; allowed: a file of the export")
        folder = self._store.file(owner, model_id, KIND, name)
        if reader != owner and not CheckpointStore.sidecar(folder, PUBLIC).exists():
            raise Forbidden(f"{KIND}/{name} of training run {model_id!r} is no longer published")
        path = (folder / file).resolve()
        if not path.is_relative_to(folder) or not path.is_file():
            raise NotFound(f"{KIND}/{name} of training run {model_id!r} has no file {file!r} (deleted?)")
        return path

    @staticmethod
    def _path(reader: str, owner: str, model_id: str, name: str, file: str) -> str:
        return f"{DOWNLOAD_PREFIX}/{reader}/{owner}/{model_id}/{name}/{file}"
