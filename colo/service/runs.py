"""Training runs and their checkpoints as the SDK's REST side (``RestClient``) shows and changes them.

A run is a live model of the tenant or, after a restart, a model whose checkpoints are on disk.
Deleting a checkpoint and changing its ``ttl_seconds`` are worker jobs, as every checkpoint write is.
"""

from __future__ import annotations

from concurrent.futures import Future
from datetime import datetime, timezone
from pathlib import Path

from tinker import types as tt

from colo.checkpoint import read_lora
from colo.service.base_model import BaseModel
from colo.service.checkpoint_store import CheckpointStore, Stored
from colo.service.checkpoints import Checkpoints
from colo.service.errors import NotFound
from colo.service.models import Models
from colo.service.worker import Worker


class Runs:
    def __init__(self, base: BaseModel, models: Models, checkpoints: Checkpoints, worker: Worker) -> None:
        self._base, self._models, self._checkpoints, self._worker = base, models, checkpoints, worker
        self._store = checkpoints.store

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

    def _stored(self, tenant: str, model_id: str, kind: str, name: str) -> Path:
        file = self._store.file(tenant, model_id, kind, name)
        if not file.is_file():
            raise NotFound(f"no checkpoint {kind}/{name} of training run {model_id!r} for this tenant")
        return file


def checkpoint_view(c: Stored) -> tt.Checkpoint:
    return tt.Checkpoint(
        checkpoint_id=f"{c.kind}/{c.name}", checkpoint_type="training" if c.kind == "weights" else "sampler",
        time=utc(c.created), tinker_path=CheckpointStore.tinker_path(c.model_id, c.kind, c.name),
        size_bytes=c.size_bytes, expires_at=utc(c.expires_at) if c.expires_at is not None else None)


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)
