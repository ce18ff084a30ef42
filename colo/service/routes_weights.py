"""Routes of weights leaving a run: external exports and their signed URLs, weights info, copies, publishing.

Each parses its request, makes one call on ``svc.external`` or ``svc.runs``, and encodes the answer.
The download route is the one route without an API key: its URL's signature is its permission.
"""

from __future__ import annotations

import asyncio

import pydantic
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from tinker import types as tt

from colo.service.external_weights import DOWNLOAD_PREFIX
from colo.service.http import Requests, as_json
from colo.service.server import Service


def routes(svc: Service, rq: Requests) -> APIRouter:
    r = APIRouter()

    @r.post("/api/v1/save_weights_external")
    async def save_weights_external(request: Request):
        tenant, req = await rq.read(request, tt.SaveWeightsExternalRequest)
        return svc.external.save(tenant, req, as_json)

    @r.get("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}/external_weights_urls")
    async def external_weights_urls(model_id: str, kind: str, name: str, request: Request):
        tenant = rq.tenant_of(request)
        return svc.external.urls(tenant, model_id, kind, name, str(request.base_url)).model_dump(mode="json")

    @r.get(DOWNLOAD_PREFIX + "/{reader}/{owner}/{model_id}/{name}/{file}")
    async def download(reader: str, owner: str, model_id: str, name: str, file: str, request: Request):
        q = request.query_params
        path = svc.external.open(reader, owner, model_id, name, file, q.get("expires"), q.get("signature"))
        # streamed in chunks from the open file: a deletion meanwhile cannot cut the download short
        return FileResponse(path, media_type="application/octet-stream", filename=file)

    @r.post("/api/v1/weights_info")
    async def weights_info(request: Request):
        tenant = rq.tenant_of(request)
        req = await rq.parse(request, WeightsInfoRequest)
        return svc.runs.weights_info(tenant, req.tinker_path).model_dump(mode="json")

    @r.post("/api/v1/copy_weights")
    async def copy_weights(request: Request):
        tenant, req = await rq.read(request, tt.CopyWeightsRequest)
        token = req.weights_access_token or request.headers.get("x-tinker-weights-access-token")
        path = await asyncio.wrap_future(svc.runs.copy(tenant, req, token, request.headers.get("x-idempotency-key")))
        return tt.CopyWeightsResponse(tinker_path=path).model_dump(mode="json")

    @r.post("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}/publish")
    async def publish(model_id: str, kind: str, name: str, request: Request):
        await asyncio.wrap_future(svc.runs.set_public(rq.tenant_of(request), model_id, kind, name, True))
        return {}

    @r.delete("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}/publish")
    async def unpublish(model_id: str, kind: str, name: str, request: Request):
        await asyncio.wrap_future(svc.runs.set_public(rq.tenant_of(request), model_id, kind, name, False))
        return {}

    return r


class WeightsInfoRequest(pydantic.BaseModel):
    """The body ``RestClient.get_weights_info_by_tinker_path`` sends (the SDK has no type for it)."""

    model_config = pydantic.ConfigDict(extra="forbid")
    tinker_path: str
