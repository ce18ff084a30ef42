"""Routes of sampling clients: sampling sessions and ``asample``; each makes one call on ``svc.sampling``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from tinker import types as tt

from colo.service import tinker_wire
from colo.service.http import Requests
from colo.service.server import Service


def routes(svc: Service, rq: Requests) -> APIRouter:
    r = APIRouter()

    @r.post("/api/v1/create_sampling_session")
    async def create_sampling_session(request: Request):
        tenant, req = await rq.read(request, tt.CreateSamplingSessionRequest)
        return {"type": "create_sampling_session", "sampling_session_id": svc.sampling.create_session(tenant, req)}

    @r.get("/api/v1/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str, request: Request):
        s = svc.sampling.get(rq.tenant_of(request), sampler_id)
        return {"sampler_id": s.sampler_id, "base_model": svc.base.name, "model_path": s.model_path}

    @r.post("/api/v1/join_sampling_session")
    async def join_sampling_session(request: Request):
        tenant, req = await rq.read(request, tt.JoinSamplingSessionRequest)
        return {"type": "join_sampling_session", "client_counter": svc.sampling.join(tenant, req.sampling_session_id)}

    @r.post("/api/v1/asample")
    async def asample(request: Request):
        tenant, req = await rq.read(request, tt.SampleRequest)
        return svc.sampling.sample(tenant, req, lambda result: (tinker_wire.sample_response(result), "proto"))

    return r
