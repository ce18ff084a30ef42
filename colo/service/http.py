"""What every route does with a request before its own work: who is asking, the body within its
limit, the body parsed with the SDK's own pydantic type; and how errors become HTTP statuses.

A malformed request answers 4xx with a message and nothing about it reaches the Trainer. Errors map
to statuses by ``errors.status_of`` (``add_error_handlers`` answers with it); anything unexpected is 500.
"""

from __future__ import annotations

import logging

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from colo.errors import ColoError
from colo.service.errors import HTTPError, status_of
from colo.service.tenants import Tenants

log = logging.getLogger(__name__)

PROTO = "application/x-protobuf"


def add_error_handlers(app: FastAPI) -> None:
    async def answer(request: Request, e: Exception):
        return JSONResponse({"detail": str(e)}, status_code=status_of(e))

    # handlers of these classes answer and are done; one for Exception runs in Starlette's outermost
    # middleware, which logs the exception again as unhandled: only the unexpected go there
    app.add_exception_handler(HTTPError, answer)
    app.add_exception_handler(ColoError, answer)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(e).__name__}"}, status_code=500)


class Requests:
    def __init__(self, tenants: Tenants, max_body_bytes: int) -> None:
        self.tenants = tenants
        self.max_body_bytes = max_body_bytes

    def tenant_of(self, request: Request) -> str:
        """The caller's tenant, from ``X-API-Key`` (the Tinker SDK) or ``Authorization: Bearer`` (OpenAI clients)."""
        auth = request.headers.get("authorization", "")
        key = request.headers.get("x-api-key") or (auth[7:] if auth.lower().startswith("bearer ") else None)
        tenant = self.tenants.tenant_of(key)
        if tenant is None:
            raise HTTPError(401, "missing or unknown API key (X-API-Key, or Authorization: Bearer); allowed: a key "
                                 "from COLO_API_KEYS")
        return tenant

    async def body(self, request: Request, limit: int | None = None) -> bytes:
        limit = self.max_body_bytes if limit is None else limit
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise HTTPError(413, f"request body of {declared} bytes; allowed: at most {limit} (COLO_MAX_BODY_MIB)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body over {limit} bytes; allowed: at most {limit} (COLO_MAX_BODY_MIB)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read(self, request: Request, model: type[pydantic.BaseModel]):
        """(the caller's tenant, the body parsed as ``model``): a key is checked before the body is read."""
        tenant = self.tenant_of(request)
        return tenant, await self.parse(request, model)

    async def parse(self, request: Request, model: type[pydantic.BaseModel]):
        body = await self.body(request)
        try:
            return model.model_validate_json(body or b"{}")
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "body"
            more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
            raise HTTPError(400, f"{model.__name__}: {where}: {err['msg']}{more}") from None


def as_json(obj: pydantic.BaseModel) -> tuple[dict, str]:
    """A future's encoder for a JSON result."""
    return obj.model_dump(mode="json", exclude_none=True), "json"

