"""OpenAI-compatible routes on the same service: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

For the ``openai`` client, evaluation harnesses and agents. ``model`` names what to sample as the Tinker
side does: the base model, a live model of the caller's tenant (its newest version), or a ``tinker://``
sampler path (exactly that saved version). Requests go to the same worker as Tinker sample requests
and are batched with them, with the same checks and fairness; the answer's ``system_fingerprint`` says
which version answered (``<model_id>@v<version>``, or ``base``). The API key comes as
``Authorization: Bearer`` (the openai client's way) or ``X-API-Key``.

Streaming sends server-sent events in OpenAI's format, one chunk per choice with its whole text: colo's
engines return whole sequences. Log probabilities are the sampled tokens' own (``top_logprobs`` at most 1).
vLLM's ``return_tokens_as_token_ids`` and prompts given as token ids work as in vLLM.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from typing import Any, Literal

import pydantic
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from colo.service.http import HTTPError, Requests, status_of
from colo.service.server import Service
from colo.service.state import Sampler
from colo.trainer import Trainer
from colo.types import SampleJob, SampleResult, SamplingParams


class _Common(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")  # OpenAI clients send fields colo has no use for

    model: str
    n: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM's extension


class CompletionRequest(_Common):
    prompt: str | list[int]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def _error(status: int, message: str) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


def openai_errors(route):
    """Errors in OpenAI's shape, with the status the rest of the service would give."""
    @functools.wraps(route)
    async def wrapped(*args, **kwargs):
        try:
            return await route(*args, **kwargs)
        except Exception as e:
            status = status_of(e)
            if status is None:
                raise
            return _error(status, str(e))
    return wrapped


def routes(svc: Service, rq: Requests) -> APIRouter:
    r = APIRouter()
    tokenizer = svc.trainer.tokenizer

    def sampler_of(tenant: str, name: str) -> Sampler:
        if name in svc.base_names:
            return Sampler(tenant, f"openai-base:{tenant}")
        if name.startswith("tinker://"):
            return svc.saved_sampler(tenant, f"openai:{tenant}:{name}", name)
        m = svc.state.model(tenant, name)
        return Sampler(tenant, f"openai:{tenant}:{name}", model_id=m.model_id)

    async def sample(tenant: str, name: str, prompt: list[int], req: _Common,
                     max_tokens: int | None) -> tuple[SampleResult, str]:
        s = sampler_of(tenant, name)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        params = SamplingParams(max_tokens=max_tokens if max_tokens is not None else 1 << 30,
                                temperature=req.temperature, top_p=req.top_p, stop=stop, seed=req.seed)

        def resolve(trainer: Trainer) -> SampleJob:
            return SampleJob(svc.resolve_adapter(trainer, s), prompt, req.n, params)

        result: SampleResult = await asyncio.wrap_future(svc.worker.sample(s.sampler_id, resolve))
        answered = "base" if result.adapter is None else f"{s.model_id or name}@v{result.adapter_version}"
        return result, answered

    def piece(token: int, as_ids: bool) -> str:
        return f"token_id:{token}" if as_ids else tokenizer.decode([token])

    def text_of(tokens: list[int], stop: tuple[str, ...]) -> str:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        return text[:cut] if cut >= 0 else text

    def usage(prompt: list[int], result: SampleResult) -> dict:
        completion = sum(len(s.tokens) for s in result.sequences)
        return {"prompt_tokens": len(prompt), "completion_tokens": completion,
                "total_tokens": len(prompt) + completion}

    def stream(chunks: list[dict]) -> StreamingResponse:
        async def events():
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @r.get("/v1/models")
    @openai_errors
    async def models(request: Request):
        tenant = rq.tenant_of(request)
        now = int(time.time())
        ids = [svc.model_name] + svc.state.model_ids(tenant)
        ids += [f"tinker://{c.model_id}/{c.kind}/{c.name}" for m in svc.checkpoints.models_on_disk(tenant)
                for c in svc.checkpoints.list(tenant, m) if c.kind == "sampler_weights"]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": tenant}
                                           for i in ids]}

    @r.post("/v1/completions")
    @openai_errors
    async def completions(request: Request):
        tenant = rq.tenant_of(request)
        req = await rq.parse(request, CompletionRequest)
        if req.logprobs is not None and not 0 <= req.logprobs <= 1:
            raise HTTPError(400, f"logprobs={req.logprobs}; allowed: 0 or 1 (colo reports the sampled token's own)")
        if req.echo:
            raise HTTPError(400, "echo=true is not supported by colo; allowed: echo=false")
        prompt = list(req.prompt) if isinstance(req.prompt, list) else tokenizer.encode(req.prompt)
        result, answered = await sample(tenant, req.model, prompt, req, req.max_tokens)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        choices = []
        for i, seq in enumerate(result.sequences):
            choice: dict[str, Any] = {"index": i, "text": text_of(seq.tokens, stop), "finish_reason": seq.stop_reason,
                                      "logprobs": None}
            if req.logprobs is not None:
                pieces = [piece(t, req.return_tokens_as_token_ids) for t in seq.tokens]
                choice["logprobs"] = {"tokens": pieces, "token_logprobs": list(seq.logprobs),
                                      "top_logprobs": [{p: lp} for p, lp in zip(pieces, seq.logprobs)]
                                      if req.logprobs else None,
                                      "text_offset": [sum(len(x) for x in pieces[:j]) for j in range(len(pieces))]}
            choices.append(choice)
        body = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model, "system_fingerprint": answered, "choices": choices,
                "usage": usage(prompt, result)}
        if req.stream:
            return stream([{**body, "choices": [c], "usage": None} for c in choices])
        return body

    @r.post("/v1/chat/completions")
    @openai_errors
    async def chat_completions(request: Request):
        tenant = rq.tenant_of(request)
        req = await rq.parse(request, ChatRequest)
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 1:
            raise HTTPError(400, f"top_logprobs={req.top_logprobs}; allowed: 0 or 1 (the sampled token's own)")
        if not getattr(tokenizer, "chat_template", None):
            raise HTTPError(400, f"the model {svc.model_name!r} has no chat template; allowed: /v1/completions")
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        result, answered = await sample(tenant, req.model, list(prompt), req, max_tokens)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        eos = svc.trainer.policy.eos_token_ids
        choices = []
        for i, seq in enumerate(result.sequences):
            tokens = [t for t in seq.tokens if t not in eos]
            content: dict[str, Any] = {"role": "assistant", "content": text_of(tokens, stop)}
            logprobs = None
            if req.logprobs:
                logprobs = {"content": [{"token": piece(t, req.return_tokens_as_token_ids), "logprob": lp,
                                         "bytes": list(tokenizer.decode([t]).encode()), "top_logprobs": []}
                                        for t, lp in zip(seq.tokens, seq.logprobs)]}
            choices.append({"index": i, "message": content, "finish_reason": seq.stop_reason, "logprobs": logprobs})
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            return stream([{"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                            "system_fingerprint": answered,
                            "choices": [{"index": c["index"], "delta": c["message"], "logprobs": c["logprobs"],
                                         "finish_reason": c["finish_reason"]}]} for c in choices])
        return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "system_fingerprint": answered, "choices": choices, "usage": usage(list(prompt), result)}

    return r
