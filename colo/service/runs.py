"""Training runs and their checkpoints as the SDK's REST side shows them (``RestClient``).

A run is a live model of the tenant or, after a restart, a model whose checkpoints are on disk.
"""

from __future__ import annotations

from datetime import datetime, timezone

from tinker import types as tt

from colo.checkpoint import read_lora
from colo.service.checkpoint_store import CheckpointStore, Stored
from colo.service.state import NotFound, State


def checkpoint_view(c: Stored) -> tt.Checkpoint:
    return tt.Checkpoint(
        checkpoint_id=f"{c.kind}/{c.name}", checkpoint_type="training" if c.kind == "weights" else "sampler",
        time=utc(c.created), tinker_path=CheckpointStore.tinker_path(c.model_id, c.kind, c.name),
        size_bytes=c.size_bytes, expires_at=utc(c.expires_at) if c.expires_at is not None else None)


def training_run(state: State, store: CheckpointStore, base_model: str, tenant: str, model_id: str) -> tt.TrainingRun:
    live = state.live_model(tenant, model_id)
    stored = store.list(tenant, model_id) if model_id in store.models_on_disk(tenant) else []
    if live is None and not stored:
        raise NotFound(f"unknown training run {model_id!r}; allowed: a model_id of this tenant")
    training = [c for c in stored if c.kind == "weights"]
    sampler = [c for c in stored if c.kind == "sampler_weights"]
    rank = live.rank if live else next((lora.rank for c in reversed(stored) if (lora := read_lora(c.file))), None)
    last = live.last_request if live else max(c.created for c in stored)
    return tt.TrainingRun(training_run_id=model_id, base_model=base_model, model_owner=tenant, is_lora=True,
                          lora_rank=rank, last_request_time=utc(last),
                          last_checkpoint=checkpoint_view(training[-1]) if training else None,
                          last_sampler_checkpoint=checkpoint_view(sampler[-1]) if sampler else None)


def run_ids(state: State, store: CheckpointStore, tenant: str) -> list[str]:
    return sorted(set(state.model_ids(tenant)) | set(store.models_on_disk(tenant)))


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)
