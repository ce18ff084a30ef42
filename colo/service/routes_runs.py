"""Routes of the SDK's REST side (``RestClient``): training runs, their checkpoints, deletion and expiry;
each makes one call on ``svc.runs``."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request

from colo.service.errors import HTTPError
from colo.service.http import Requests
from colo.service.server import Service


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

    @r.get("/api/v1/training_runs")
    async def list_training_runs(request: Request):
        tenant = rq.tenant_of(request)
        return svc.runs.page(tenant, *page(request)).model_dump(mode="json")

    @r.get("/api/v1/training_runs/{model_id}")
    async def get_training_run(model_id: str, request: Request):
        return svc.runs.get(rq.tenant_of(request), model_id).model_dump(mode="json")

    @r.get("/api/v1/training_runs/{model_id}/checkpoints")
    async def list_checkpoints(model_id: str, request: Request):
        return svc.runs.checkpoints(rq.tenant_of(request), model_id).model_dump(mode="json")

    @r.get("/api/v1/checkpoints")
    async def list_user_checkpoints(request: Request):
        tenant = rq.tenant_of(request)
        return svc.runs.user_checkpoints(tenant, *page(request)).model_dump(mode="json")

    @r.delete("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}")
    async def delete_checkpoint(model_id: str, kind: str, name: str, request: Request):
        await asyncio.wrap_future(svc.runs.delete(rq.tenant_of(request), model_id, kind, name))
        return {}

    @r.put("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}/ttl")
    async def set_checkpoint_ttl(model_id: str, kind: str, name: str, request: Request):
        tenant = rq.tenant_of(request)
        try:
            ttl = json.loads(await rq.body(request) or b"{}").get("ttl_seconds")
        except (ValueError, AttributeError):
            raise HTTPError(400, "body: allowed: {\"ttl_seconds\": <seconds> or null}") from None
        await asyncio.wrap_future(svc.runs.set_ttl(tenant, model_id, kind, name, ttl))
        return {}

    return r
