"""Routes of training clients: models, forward_backward, optim_step, saving and loading weights.

Each route parses its request, looks up what it names (another tenant's ids read as unknown), and
submits one job to the worker; training jobs of a model run in its ``seq_id`` order. The client
polls the job's future (``routes_session``).
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from tinker import types as tt

from colo.errors import InvalidRequestError
from colo.service import tinker_wire
from colo.service.checkpoint_store import CheckpointStore
from colo.service.http import PROTO, HTTPError, Requests, as_json, checked_ttl
from colo.service.server import Service
from colo.service.state import Sampler
from colo.trainer import Trainer
from colo.types import AdamParams


def routes(svc: Service, rq: Requests) -> APIRouter:
    r = APIRouter()

    def new_model_id(session_id: str, model_seq_id: int) -> str:
        model_id = f"{session_id}:train:{model_seq_id}"
        if svc.state.has_model(model_id):
            raise HTTPError(400, f"model_seq_id {model_seq_id} was already used in this session")
        return model_id

    @r.post("/api/v1/create_model")
    async def create_model(request: Request):
        tenant = rq.tenant_of(request)
        req = await rq.parse(request, tt.CreateModelRequest)
        session = svc.state.session(tenant, req.session_id)
        svc.check_base_model(req.base_model)
        if req.optimizer_config.type != "adamw":
            raise HTTPError(400, f"optimizer {req.optimizer_config.type!r}; allowed: adamw")
        if req.lora_config is None:
            raise HTTPError(400, "lora_config is missing; colo trains LoRA adapters only")
        model_id = new_model_id(req.session_id, req.model_seq_id)
        lora = req.lora_config

        def run(trainer: Trainer) -> str:
            svc.check_quota(tenant)
            adapter = trainer.create_lora(rank=lora.rank, seed=lora.seed, train_attn=lora.train_attn,
                                          train_mlp=lora.train_mlp, train_unembed=lora.train_unembed)
            svc.add_model(session, model_id, adapter, lora.rank)
            return model_id

        return svc.submit(tenant, svc.worker.call(run), lambda mid: as_json(tt.CreateModelResponse(model_id=mid)))

    @r.post("/api/v1/get_info")
    async def get_info(request: Request):
        tenant = rq.tenant_of(request)
        req = await rq.parse(request, tt.GetInfoRequest)
        m = svc.state.model(tenant, req.model_id)
        return {"type": "get_info", "model_id": m.model_id, "is_lora": True, "lora_rank": m.rank,
                "model_name": svc.model_name,
                "model_data": {"arch": svc.arch, "model_name": svc.model_name,
                               "tokenizer_id": svc.trainer.model_path}}

    @r.post("/api/v1/unload_model")
    async def unload_model(request: Request):
        tenant = rq.tenant_of(request)
        req = await rq.parse(request, tt.UnloadModelRequest)
        m = svc.state.model(tenant, req.model_id)
        return svc.submit(tenant, svc.drop_model(m.model_id),
                          lambda mid: as_json(tt.UnloadModelResponse(model_id=mid, type="unload_model")))

    @r.post("/api/v1/forward_backward")
    async def forward_backward(request: Request):
        tenant = rq.tenant_of(request)
        if PROTO not in request.headers.get("content-type", ""):
            raise HTTPError(415, f"forward_backward takes {PROTO} (the SDK's ForwardBackwardRequest)")
        body = tinker_wire.decompress(await rq.body(request), request.headers.get("content-encoding"))
        call = tinker_wire.parse_forward_backward(body)
        m = svc.state.model(tenant, call.model_id)
        verb = "forward" if call.forward_only else "forward_backward"

        def run(trainer: Trainer):
            if call.loss_fn == "stable_reinforce":
                for i, (d, spans) in enumerate(zip(call.data, call.spans)):
                    if not spans:
                        raise InvalidRequestError(
                            f"data[{i}] has no loss_fn_input_spans; stable_reinforce trains on sequences recorded at "
                            "sampling time: allowed: datums with provenance spans (Datum.with_provenance) naming "
                            "sequences sampled with record_stability_info=True")
                    targets = d.loss_fn_inputs.get("target_tokens")
                    advantages = d.loss_fn_inputs.get("advantages")
                    if targets is None or advantages is None:
                        break  # the Trainer's own checks say what is missing
                    # the loss weighs by what the sampler really computed, not by what the client sent
                    d.loss_fn_inputs["logprobs"] = svc.stability.sampler_logprobs(
                        tenant, i, targets.tolist(), advantages, spans)
            return getattr(trainer, verb)(m.adapter, call.data, call.loss_fn, call.loss_fn_config)

        return svc.ordered(tenant, m, call.seq_id, run,
                           lambda out: (tinker_wire.forward_backward_output(out), "proto"))

    @r.post("/api/v1/optim_step")
    async def optim_step(request: Request):
        tenant = rq.tenant_of(request)
        req = await rq.parse(request, tt.OptimStepRequest)
        m = svc.state.model(tenant, req.model_id)
        p = req.optim_params
        if not isinstance(p, tt.AdamParams):
            raise HTTPError(400, f"optimizer {getattr(p, 'type', '?')!r}; allowed: adam_params")
        adam = AdamParams(learning_rate=p.learning_rate, beta1=p.beta1, beta2=p.beta2, eps=p.eps,
                          weight_decay=p.weight_decay, grad_clip_norm=p.grad_clip_norm)
        return svc.ordered(tenant, m, req.seq_id, lambda t: t.optim_step(m.adapter, adam),
                           lambda out: as_json(tt.OptimStepResponse(metrics=out.metrics)))

    @r.post("/api/v1/save_weights")
    async def save_weights(request: Request):
        tenant = rq.tenant_of(request)
        req = await rq.parse(request, tt.SaveWeightsRequest)
        m = svc.state.model(tenant, req.model_id)
        name = req.path or f"step-{uuid.uuid4().hex[:8]}"
        file = svc.checkpoints.file(tenant, m.model_id, "weights", name)
        ttl = checked_ttl(req.ttl_seconds)
        overwrite = req.overwrite

        def run(trainer: Trainer) -> str:
            if file.exists() and not overwrite:
                raise InvalidRequestError(f"checkpoint {name!r} exists; allowed: a new name, or overwrite=True")
            svc.before_save(trainer, file.parent.parent)
            trainer.save_state(m.adapter, file, optimizer=True)
            CheckpointStore.set_ttl(file, ttl)
            return CheckpointStore.tinker_path(m.model_id, "weights", name)

        return svc.ordered(tenant, m, req.seq_id, run, lambda path: as_json(tt.SaveWeightsResponse(path=path)))

    @r.post("/api/v1/load_weights")
    async def load_weights(request: Request):
        tenant = rq.tenant_of(request)
        req = await rq.parse(request, tt.LoadWeightsRequest)
        _, _, _, file = svc.checkpoints.parse(tenant, req.path)
        if not file.is_file():
            raise HTTPError(404, f"no checkpoint {req.path!r} for this tenant")
        with_optimizer = req.optimizer

        def load(trainer: Trainer, adapter: str | None) -> str:
            return trainer.load_state(file, adapter=adapter, optimizer=with_optimizer)

        if req.session_id is not None:  # a new model, created from the checkpoint
            session = svc.state.session(tenant, req.session_id)
            svc.check_base_model(req.base_model)
            model_id = new_model_id(req.session_id, req.model_seq_id)

            def create(trainer: Trainer) -> str:
                svc.check_quota(tenant)
                adapter = load(trainer, None)
                svc.add_model(session, model_id, adapter, trainer.adapters[adapter].lora.rank)
                return model_id

            return svc.submit(tenant, svc.worker.call(create),
                              lambda mid: as_json(tt.LoadWeightsResponse(path=req.path, model_id=mid)))
        if req.model_id is None:
            raise HTTPError(400, "load_weights needs model_id (with seq_id) or session_id (with model_seq_id)")
        m = svc.state.model(tenant, req.model_id)
        return svc.ordered(tenant, m, req.seq_id, lambda t: load(t, m.adapter),
                           lambda _: as_json(tt.LoadWeightsResponse(path=req.path, model_id=m.model_id)))

    @r.post("/api/v1/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request):
        tenant = rq.tenant_of(request)
        req = await rq.parse(request, tt.SaveWeightsForSamplerRequest)
        m = svc.state.model(tenant, req.model_id)
        named = req.path is not None
        name = req.path if named else f"ephemeral-{uuid.uuid4().hex[:12]}"
        file = svc.checkpoints.file(tenant, m.model_id, "sampler_weights", name)
        path = CheckpointStore.tinker_path(m.model_id, "sampler_weights", name)
        inflight = req.kind == "inflight"
        ttl = checked_ttl(req.ttl_seconds)

        def run(trainer: Trainer) -> tt.SaveWeightsForSamplerResponseInternal:
            version = trainer.version(m.adapter)
            svc.before_save(trainer, file.parent.parent)
            trainer.save_state(m.adapter, file, optimizer=False)
            CheckpointStore.set_ttl(file, ttl)
            svc.state.saved_as(file, m.model_id, version)
            if named:
                return tt.SaveWeightsForSamplerResponseInternal(path=path)
            svc.prune_ephemeral(trainer, file.parent)
            sampler = Sampler(tenant, uuid.uuid4().hex, path, m.model_id, None if inflight else version, file)
            svc.state.add_sampler(sampler)
            return tt.SaveWeightsForSamplerResponseInternal(sampling_session_id=sampler.sampler_id)

        return svc.ordered(tenant, m, req.seq_id, run, as_json)

    return r
