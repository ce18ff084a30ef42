"""What every route does with a request before its own work: who is asking, the body within its
limit, the body parsed with the SDK's own pydantic type; and how errors become HTTP statuses.

A malformed request answers 4xx with a message and nothing about it reaches the Trainer. Errors map
to statuses in one place (``add_error_handlers``): ``NotFound`` 404, ``Gone`` 410, any other of
colo's request errors 400, the worker refusing work while it stops 503, anything unexpected 500.
"""

from __future__ import annotations

import logging

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from colo.errors import ColoError, EngineError
from colo.service.state import Gone, NotFound
from colo.service.tenants import Tenants

log = logging.getLogger(__name__)

PROTO = "application/x-protobuf"


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def add_error_handlers(app: FastAPI) -> None:
    def answer(status: int):
        async def handler(request: Request, e: Exception):
            return JSONResponse({"detail": str(e)}, status_code=status)
        return handler

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError):
        return JSONResponse({"detail": str(e)}, status_code=e.status)

    app.add_exception_handler(NotFound, answer(404))
    app.add_exception_handler(Gone, answer(410))
    app.add_exception_handler(EngineError, answer(503))  # the worker is stopping
    app.add_exception_handler(ColoError, answer(400))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(e).__name__}"}, status_code=500)


class Requests:
    def __init__(self, tenants: Tenants, max_body_bytes: int) -> None:
        self.tenants = tenants
        self.max_body_bytes = max_body_bytes

    def tenant_of(self, request: Request) -> str:
        tenant = self.tenants.tenant_of(request.headers.get("x-api-key"))
        if tenant is None:
            raise HTTPError(401, "missing or unknown API key (X-API-Key); allowed: a key from COLO_API_KEYS")
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


def checked_ttl(ttl) -> int | None:
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= 10 * 365 * 86400):
        raise HTTPError(400, f"ttl_seconds={ttl!r}; allowed: None (keep) or whole seconds in [1, 315360000]")
    return ttl
