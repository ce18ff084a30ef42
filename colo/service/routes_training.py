"""Routes of training clients: models, custom losses, forward_backward, optim_step, saving and loading weights.

Each route parses its request, makes one call on ``svc.training`` (or ``svc.sampling`` for a save for
sampling), and says how the job's result is encoded when the client polls it (``routes_session``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from tinker import types as tt

from colo.service import tinker_wire
from colo.service.errors import HTTPError
from colo.service.http import PROTO, Requests, as_json
from colo.service.server import Service


def routes(svc: Service, rq: Requests) -> APIRouter:
    r = APIRouter()

    @r.post("/api/v1/create_model")
    async def create_model(request: Request):
        tenant, req = await rq.read(request, tt.CreateModelRequest)
        return svc.training.create_model(tenant, req, lambda mid: as_json(tt.CreateModelResponse(model_id=mid)))

    @r.post("/api/v1/get_info")
    async def get_info(request: Request):
        tenant, req = await rq.read(request, tt.GetInfoRequest)
        return svc.training.info(tenant, req.model_id)

    @r.post("/api/v1/unload_model")
    async def unload_model(request: Request):
        tenant, req = await rq.read(request, tt.UnloadModelRequest)
        return svc.training.unload(tenant, req.model_id,
                                   lambda mid: as_json(tt.UnloadModelResponse(model_id=mid, type="unload_model")))

    @r.post("/api/v1/forward_backward")
    async def forward_backward(request: Request):
        tenant = rq.tenant_of(request)
        if PROTO not in request.headers.get("content-type", ""):
            raise HTTPError(415, f"forward_backward takes {PROTO} (the SDK's ForwardBackwardRequest)")
        body = tinker_wire.decompress(await rq.body(request), request.headers.get("content-encoding"))
        call = tinker_wire.parse_forward_backward(body)
        return svc.training.forward_backward(tenant, call, lambda out: (tinker_wire.forward_backward_output(out), "proto"))

    @r.post("/api/v1/create_custom_loss")
    async def create_custom_loss(request: Request):
        tenant, req = await rq.read(request, tt.CreateCustomLossRequest)
        return svc.training.create_custom_loss(tenant, req,
                                               lambda loss_id: as_json(tt.CreateCustomLossResponse(loss_id=loss_id)))

    @r.post("/api/v1/optim_step")
    async def optim_step(request: Request):
        tenant, req = await rq.read(request, tt.OptimStepRequest)
        return svc.training.optim_step(tenant, req, lambda out: as_json(tt.OptimStepResponse(metrics=out.metrics)))

    @r.post("/api/v1/save_weights")
    async def save_weights(request: Request):
        tenant, req = await rq.read(request, tt.SaveWeightsRequest)
        return svc.training.save_state(tenant, req, lambda path: as_json(tt.SaveWeightsResponse(path=path)))

    @r.post("/api/v1/load_weights")
    async def load_weights(request: Request):
        tenant, req = await rq.read(request, tt.LoadWeightsRequest)
        return svc.training.load_state(tenant, req,
                                       lambda mid: as_json(tt.LoadWeightsResponse(path=req.path, model_id=mid)))

    @r.post("/api/v1/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request):
        tenant, req = await rq.read(request, tt.SaveWeightsForSamplerRequest)
        return svc.sampling.save_for_sampler(tenant, req, as_json)

    return r
