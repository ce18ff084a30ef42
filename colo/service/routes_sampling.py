"""Routes of sampling clients: sampling sessions and ``asample``.

A sampling session names what it samples (the base model, a model's live weights, or a saved version);
the worker resolves that to an adapter when the request joins a batch, so a snapshot keeps sampling
exactly its version while training goes on. With ``record_stability_info`` each sampled sequence is
recorded for ``stable_reinforce`` (``colo.service.stability``).
"""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from tinker import types as tt

from colo.service import tinker_wire
from colo.service.http import HTTPError, Requests
from colo.service.server import Service
from colo.service.state import Sampler
from colo.trainer import Trainer
from colo.types import SampleJob


def routes(svc: Service, rq: Requests) -> APIRouter:
    r = APIRouter()

    @r.post("/api/v1/create_sampling_session")
    async def create_sampling_session(request: Request):
        tenant = rq.tenant_of(request)
        req = await rq.parse(request, tt.CreateSamplingSessionRequest)
        session = svc.state.session(tenant, req.session_id)
        sampler_id = uuid.uuid4().hex
        if req.model_path is None:
            svc.check_base_model(req.base_model)
            sampler = Sampler(tenant, sampler_id)
        else:
            sampler = svc.saved_sampler(tenant, sampler_id, req.model_path)
        svc.state.add_sampler(sampler, session)
        return {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    @r.get("/api/v1/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str, request: Request):
        s = svc.state.sampler(rq.tenant_of(request), sampler_id)
        return {"sampler_id": s.sampler_id, "base_model": svc.model_name, "model_path": s.model_path}

    @r.post("/api/v1/join_sampling_session")
    async def join_sampling_session(request: Request):
        tenant = rq.tenant_of(request)
        req = await rq.parse(request, tt.JoinSamplingSessionRequest)
        s = svc.state.sampler(tenant, req.sampling_session_id)
        return {"type": "join_sampling_session", "client_counter": svc.state.join(s)}

    @r.post("/api/v1/asample")
    async def asample(request: Request):
        tenant = rq.tenant_of(request)
        req = await rq.parse(request, tt.SampleRequest)
        unsupported = [name for name, on in (
            ("topk_prompt_logprobs", req.topk_prompt_logprobs > 0), ("topk_sample_logprobs", req.topk_sample_logprobs > 0),
            ("target_prompt_logprobs", req.target_prompt_logprobs is not None),
            ("prompt_alt_tokens_k", req.prompt_alt_tokens_k > 0),
            ("prompt_logprobs_last_n", req.prompt_logprobs_last_n is not None)) if on]
        if unsupported:
            raise HTTPError(400, f"{', '.join(unsupported)}: not supported by colo; allowed: prompt_logprobs")
        if req.sampling_session_id is not None:
            s = svc.state.sampler(tenant, req.sampling_session_id)
        else:  # an ad-hoc request names its weights itself
            if req.model_path is not None:
                raise HTTPError(400, "sampling by model_path needs a sampling session; create_sampling_session")
            svc.check_base_model(req.base_model)
            s = Sampler(tenant, "base")
        prompt = tinker_wire.tokens_of(req.prompt, "prompt")
        params = tinker_wire.sampling_params(req.sampling_params)
        want_prompt = bool(req.prompt_logprobs)

        def resolve(trainer: Trainer) -> SampleJob:
            return SampleJob(svc.resolve_adapter(trainer, s), prompt, req.num_samples, params, want_prompt)

        future = svc.worker.sample(s.sampler_id, resolve)
        answer = svc.submit(tenant, future, lambda result: (tinker_wire.sample_response(result), "proto"))
        ids = [f"{answer['request_id']}:{i}" for i in range(req.num_samples)]
        answer["sample_sequence_ids"] = ids  # the SDK expects them on every sample, recorded or not
        if req.record_stability_info:
            def record(done) -> None:
                if done.exception() is None:
                    for sequence_id, seq in zip(ids, done.result().sequences):
                        svc.stability.record(tenant, sequence_id, prompt, seq.tokens, seq.logprobs)

            future.add_done_callback(record)
        return answer

    return r
