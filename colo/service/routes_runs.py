"""Routes of the SDK's REST side (``RestClient``): training runs, their checkpoints, deletion and expiry."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import APIRouter, Request
from tinker import types as tt

from colo.service import runs
from colo.service.checkpoint_store import CheckpointStore
from colo.service.http import HTTPError, Requests, checked_ttl
from colo.service.server import Service
from colo.trainer import Trainer


def page(request: Request) -> tuple[int, int]:
    try:
        limit = int(request.query_params.get("limit", 20))
        offset = int(request.query_params.get("offset", 0))
    except ValueError:
        raise HTTPError(400, "limit and offset must be integers") from None
    if not (1 <= limit <= 1000 and offset >= 0):
        raise HTTPError(400, f"limit={limit}, offset={offset}; allowed: limit in [1, 1000], offset >= 0")
    return limit, offset


def routes(svc: Service, rq: Requests) -> APIRouter:
    r = APIRouter()

    def run_of(tenant: str, model_id: str) -> tt.TrainingRun:
        return runs.training_run(svc.state, svc.checkpoints, svc.model_name, tenant, model_id)

    @r.get("/api/v1/training_runs")
    async def list_training_runs(request: Request):
        tenant = rq.tenant_of(request)
        limit, offset = page(request)
        ids = runs.run_ids(svc.state, svc.checkpoints, tenant)
        return tt.TrainingRunsResponse(
            training_runs=[run_of(tenant, i) for i in ids[offset: offset + limit]],
            cursor=tt.Cursor(offset=offset, limit=limit, total_count=len(ids))).model_dump(mode="json")

    @r.get("/api/v1/training_runs/{model_id}")
    async def get_training_run(model_id: str, request: Request):
        return run_of(rq.tenant_of(request), model_id).model_dump(mode="json")

    @r.get("/api/v1/training_runs/{model_id}/checkpoints")
    async def list_checkpoints(model_id: str, request: Request):
        tenant = rq.tenant_of(request)
        svc.checkpoints.file(tenant, model_id, "weights", "x")  # the id's pattern
        stored = svc.checkpoints.list(tenant, model_id)
        return tt.CheckpointsListResponse(checkpoints=[runs.checkpoint_view(c) for c in stored]).model_dump(mode="json")

    @r.get("/api/v1/checkpoints")
    async def list_user_checkpoints(request: Request):
        tenant = rq.tenant_of(request)
        limit, offset = page(request)
        stored = sorted((c for m in svc.checkpoints.models_on_disk(tenant) for c in svc.checkpoints.list(tenant, m)),
                        key=lambda c: c.created, reverse=True)
        return tt.CheckpointsListResponse(
            checkpoints=[runs.checkpoint_view(c) for c in stored[offset: offset + limit]],
            cursor=tt.Cursor(offset=offset, limit=limit, total_count=len(stored))).model_dump(mode="json")

    def stored_file(tenant: str, model_id: str, kind: str, name: str) -> Path:
        file = svc.checkpoints.file(tenant, model_id, kind, name)
        if not file.is_file():
            raise HTTPError(404, f"no checkpoint {kind}/{name} of training run {model_id!r} for this tenant")
        return file

    @r.delete("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}")
    async def delete_checkpoint(model_id: str, kind: str, name: str, request: Request):
        file = stored_file(rq.tenant_of(request), model_id, kind, name)

        def delete(trainer: Trainer) -> None:  # on the worker, which writes checkpoints
            svc.delete_checkpoint(trainer, file)

        await asyncio.wrap_future(svc.worker.call(delete))
        return {}

    @r.put("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}/ttl")
    async def set_checkpoint_ttl(model_id: str, kind: str, name: str, request: Request):
        file = stored_file(rq.tenant_of(request), model_id, kind, name)
        try:
            ttl = json.loads(await rq.body(request) or b"{}").get("ttl_seconds")
        except (ValueError, AttributeError):
            raise HTTPError(400, "body: allowed: {\"ttl_seconds\": <seconds> or null}") from None
        CheckpointStore.set_ttl(file, checked_ttl(ttl))
        return {}

    return r
