"""Training runs and their checkpoints as the SDK's REST side (``RestClient``) shows and changes them.

A run is a live model of the tenant or, after a restart, a model whose checkpoints are on disk (a copy
made by ``copy_weights`` is such a run). Deleting, publishing and copying a checkpoint and changing its
``ttl_seconds`` are worker jobs, as every checkpoint write is. A published checkpoint is readable by
every tenant's key (sampling, ``load_weights``, ``weights_info``, its signed URLs, a copy); only its
owner changes or deletes it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from concurrent.futures import Future
from datetime import datetime, timezone
from pathlib import Path

from tinker import types as tt

from colo.checkpoint import read_lora
from colo.errors import InvalidRequestError
from colo.service.base_model import BaseModel
from colo.service.checkpoint_store import CheckpointStore, Stored
from colo.service.checkpoints import Checkpoints
from colo.service.errors import NotFound
from colo.service.models import Models
from colo.service.worker import Worker

COPIES_REMEMBERED = 1024  # copy_weights' idempotency keys kept (the SDK retries within seconds)


class Runs:
    def __init__(self, base: BaseModel, models: Models, checkpoints: Checkpoints, worker: Worker) -> None:
        self._base, self._models, self._checkpoints, self._worker = base, models, checkpoints, worker
        self._store = checkpoints.store
        self._copies: dict[tuple[str, str], Future] = {}  # (tenant, X-Idempotency-Key) -> the copy's job

    def get(self, tenant: str, model_id: str) -> tt.TrainingRun:
        live = self._models.live(tenant, model_id)
        stored = self._store.list(tenant, model_id) if model_id in self._store.models_on_disk(tenant) else []
        if live is None and not stored:
            raise NotFound(f"unknown training run {model_id!r}; allowed: a model_id of this tenant")
        training = [c for c in stored if c.kind == "weights"]
        sampler = [c for c in stored if c.kind == "sampler_weights"]
        if live is not None:
            rank, last = live[0].rank, live[1]
        else:
            rank = next((lora.rank for c in reversed(stored) if (lora := read_lora(c.file))), None)
            last = max(c.created for c in stored)
        return tt.TrainingRun(training_run_id=model_id, base_model=self._base.name, model_owner=tenant, is_lora=True,
                              lora_rank=rank, last_request_time=utc(last),
                              last_checkpoint=checkpoint_view(training[-1]) if training else None,
                              last_sampler_checkpoint=checkpoint_view(sampler[-1]) if sampler else None)

    def page(self, tenant: str, limit: int, offset: int) -> tt.TrainingRunsResponse:
        ids = sorted(set(self._models.ids(tenant)) | set(self._store.models_on_disk(tenant)))
        return tt.TrainingRunsResponse(training_runs=[self.get(tenant, i) for i in ids[offset: offset + limit]],
                                       cursor=tt.Cursor(offset=offset, limit=limit, total_count=len(ids)))

    def checkpoints(self, tenant: str, model_id: str) -> tt.CheckpointsListResponse:
        return tt.CheckpointsListResponse(checkpoints=[checkpoint_view(c) for c in self._store.list(tenant, model_id)])

    def user_checkpoints(self, tenant: str, limit: int, offset: int) -> tt.CheckpointsListResponse:
        stored = sorted((c for m in self._store.models_on_disk(tenant) for c in self._store.list(tenant, m)),
                        key=lambda c: c.created, reverse=True)
        return tt.CheckpointsListResponse(checkpoints=[checkpoint_view(c) for c in stored[offset: offset + limit]],
                                          cursor=tt.Cursor(offset=offset, limit=limit, total_count=len(stored)))

    def delete(self, tenant: str, model_id: str, kind: str, name: str) -> Future:
        file = self._stored(tenant, model_id, kind, name)
        return self._worker.call(lambda trainer: self._checkpoints.delete(trainer, file))

    def set_ttl(self, tenant: str, model_id: str, kind: str, name: str, ttl) -> Future:
        file = self._stored(tenant, model_id, kind, name)
        ttl = CheckpointStore.checked_ttl(ttl)
        return self._worker.call(lambda trainer: self._checkpoints.set_ttl(file, ttl))

    def set_public(self, tenant: str, model_id: str, kind: str, name: str, public: bool) -> Future:
        file = self._stored(tenant, model_id, kind, name)
        return self._worker.call(lambda trainer: self._store.set_public(file, public))

    def weights_info(self, tenant: str, tinker_path: str) -> tt.WeightsInfoResponse:
        """What loading the checkpoint needs (``create_training_client_from_state`` asks first)."""
        c = self._store.locate(tenant, tinker_path)
        if c.kind == "external_weights":
            config = c.file / "adapter_config.json"
            if not config.is_file():
                raise InvalidRequestError(f"{tinker_path} is encrypted: its configuration is readable only with "
                                          "its recipients' keys")
            peft = json.loads(config.read_text())
            return tt.WeightsInfoResponse(base_model=self._base.name, is_lora=True, lora_rank=peft.get("r"))
        lora = read_lora(c.file)
        if lora is None:
            raise NotFound(f"{tinker_path} is being replaced or is not a colo checkpoint")
        return tt.WeightsInfoResponse(base_model=self._base.name, is_lora=True, lora_rank=lora.rank,
                                      train_attn=lora.train_attn, train_mlp=lora.train_mlp,
                                      train_unembed=lora.train_unembed)

    def copy(self, tenant: str, req: tt.CopyWeightsRequest, token: str | None, idempotency_key: str | None) -> Future:
        """Copy a checkpoint (the tenant's own, or one published) into a new run of the tenant; the job's
        result is the copy's path. Files are hard links where the disk allows, so no bytes are repeated. The
        SDK sends the same ``X-Idempotency-Key`` again when it retries: that copies once."""
        done = self._copies.get((tenant, idempotency_key)) if idempotency_key else None
        if done is not None:
            return done
        if token is not None:
            raise InvalidRequestError("weights_access_token: colo keeps no accounts to exchange tokens with; a "
                                      "checkpoint another tenant published is readable with your own key")
        source = self._store.locate(tenant, req.source_path)
        ttl = CheckpointStore.checked_ttl(req.ttl_seconds)
        if req.session_id is not None:
            if req.model_seq_id is None:
                raise InvalidRequestError("copy_weights with session_id needs model_seq_id")
            run_id = self._models.new_id(req.session_id, req.model_seq_id)
        else:  # a project: colo keeps none, so the copy is a run of the tenant's own
            run_id = f"copy-{uuid.uuid4().hex[:12]}"
        target = self._store.file(tenant, run_id, source.kind, source.name)

        def run(trainer) -> str:
            if target.exists():
                raise InvalidRequestError(f"training run {run_id!r} already holds {source.kind}/{source.name}")
            self._checkpoints.write(trainer, target, ttl, lambda: link_copy(source.file, target))
            return CheckpointStore.tinker_path(run_id, source.kind, source.name)

        future = self._worker.call(run)
        if idempotency_key:
            if len(self._copies) >= COPIES_REMEMBERED:  # a retry comes within seconds: forget the oldest
                del self._copies[next(iter(self._copies))]
            self._copies[(tenant, idempotency_key)] = future
        return future

    def _stored(self, tenant: str, model_id: str, kind: str, name: str) -> Path:
        file = self._store.file(tenant, model_id, kind, name)
        if not file.exists():
            raise NotFound(f"no checkpoint {kind}/{name} of training run {model_id!r} for this tenant")
        return file


def link_copy(source: Path, target: Path) -> None:
    """``source`` (a file, or a folder of files) at ``target``, as hard links where the disk allows."""
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    target.parent.mkdir(parents=True, exist_ok=True)
    pairs = [(f, tmp / f.name) for f in source.iterdir() if f.is_file()] if source.is_dir() else [(source, tmp)]
    if source.is_dir():
        tmp.mkdir()
    for src, dst in pairs:
        try:
            os.link(src, dst)
        except OSError:  # another file system, or one without links
            shutil.copyfile(src, dst)
    os.replace(tmp, target)


TYPES = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}


def checkpoint_view(c: Stored) -> tt.Checkpoint:
    return tt.Checkpoint(
        checkpoint_id=f"{c.kind}/{c.name}", checkpoint_type=TYPES[c.kind],
        time=utc(c.created), tinker_path=CheckpointStore.tinker_path(c.model_id, c.kind, c.name),
        size_bytes=c.size_bytes, public=c.public,
        expires_at=utc(c.expires_at) if c.expires_at is not None else None)


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)
