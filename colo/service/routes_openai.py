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

import functools
import json
import time
import uuid
from typing import Any, Literal

import pydantic
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from colo.service.base_model import BaseModel
from colo.service.errors import HTTPError, status_of
from colo.service.http import Requests
from colo.service.server import Service
from colo.types import SampleResult, SamplingParams


class _Common(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")  # OpenAI clients send fields colo has no use for

    model: str
    n: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM's extension

    @pydantic.field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, stop):
        """OpenAI takes one string, a list, or null; colo's SamplingParams and the text cut take a tuple."""
        return () if stop is None else (stop,) if isinstance(stop, str) else stop

    def token_limit(self) -> int | None:
        return self.max_tokens

    def check(self) -> None:
        """What the route's own fields allow beyond their types."""

    def prompt_tokens(self, base: BaseModel) -> list[int]:
        raise NotImplementedError

    def params(self) -> SamplingParams:
        limit = self.token_limit()
        return SamplingParams(max_tokens=limit if limit is not None else 1 << 30, temperature=self.temperature,
                              top_p=self.top_p, stop=self.stop, seed=self.seed)


class CompletionRequest(_Common):
    prompt: str | list[int]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False

    def check(self) -> None:
        if self.logprobs is not None and not 0 <= self.logprobs <= 1:
            raise HTTPError(400, f"logprobs={self.logprobs}; allowed: 0 or 1 (colo reports the sampled token's own)")
        if self.echo:
            raise HTTPError(400, "echo=true is not supported by colo; allowed: echo=false")

    def prompt_tokens(self, base: BaseModel) -> list[int]:
        return list(self.prompt) if isinstance(self.prompt, list) else base.tokenizer.encode(self.prompt)


class ChatMessage(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self) -> None:
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 1:
            raise HTTPError(400, f"top_logprobs={self.top_logprobs}; allowed: 0 or 1 (the sampled token's own)")

    def prompt_tokens(self, base: BaseModel) -> list[int]:
        if not getattr(base.tokenizer, "chat_template", None):
            raise HTTPError(400, f"the model {base.name!r} has no chat template; allowed: /v1/completions")
        messages = [m.model_dump(exclude_none=True) for m in self.messages]
        return list(base.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))


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
    tokenizer = svc.base.tokenizer

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
        return {"object": "list", "data": [{"id": i, "object": "model", "created": now, "owned_by": tenant}
                                           for i in svc.sampling.names(tenant)]}

    async def sampled(request: Request, kind: type[_Common]):
        """(the request, its prompt, the result, which version answered)."""
        tenant, req = await rq.read(request, kind)
        req.check()
        prompt = req.prompt_tokens(svc.base)
        result, answered = await svc.sampling.complete(tenant, req.model, prompt, req.n, req.params())
        return req, prompt, result, answered

    @r.post("/v1/completions")
    @openai_errors
    async def completions(request: Request):
        req, prompt, result, answered = await sampled(request, CompletionRequest)
        choices = []
        for i, seq in enumerate(result.sequences):
            choice: dict[str, Any] = {"index": i, "text": text_of(seq.tokens, req.stop), "finish_reason": seq.stop_reason,
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
        req, prompt, result, answered = await sampled(request, ChatRequest)
        eos = svc.base.eos_token_ids
        choices = []
        for i, seq in enumerate(result.sequences):
            tokens = [t for t in seq.tokens if t not in eos]
            content: dict[str, Any] = {"role": "assistant", "content": text_of(tokens, req.stop)}
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
                "system_fingerprint": answered, "choices": choices, "usage": usage(prompt, result)}

    return r
