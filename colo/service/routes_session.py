"""Routes of the service itself: health, client configuration, sessions, request futures, and who the
caller is.

A job's POST answers ``{request_id}`` at once; the client polls ``retrieve_future``. A failed job
answers 200 with ``{error, category}`` (the SDK retries any 5xx forever): "user" for the caller's own
mistakes, "server" for the engine's. ``retrieve_futures`` long-polls a sampling client's completion
queue: which requests finished or failed, no payloads (the SDK then fetches each by ``retrieve_future``).
"""

from __future__ import annotations

import json
import zlib

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from tinker import types as tt
from tinker.cli.auth_api import SelfApiKeyResponse

from colo.errors import ColoError, EngineError
from colo.service.errors import HTTPError
from colo.service.futures import POLL_SECONDS
from colo.service.http import PROTO, Requests
from colo.service.routes_runs import page
from colo.service.server import Service

TELEMETRY_MAX_BYTES = 1 << 20  # the SDK's usage reports: small JSON documents, read and dropped


def routes(svc: Service, rq: Requests) -> APIRouter:
    r = APIRouter()

    @r.get("/api/v1/healthz")
    @r.get("/healthz")
    async def healthz():
        status, body = svc.health()
        return JSONResponse(body, status_code=status)

    @r.post("/api/v1/client/config")
    async def client_config(request: Request):
        rq.tenant_of(request)
        # sample_use_retrieve_futures: each sampling client long-polls its completion queue
        # (/api/v1/retrieve_futures) instead of one poll per sample. custom_loss_server_side:
        # create_custom_loss uploads the traced loss graph (checked and run by colo.custom_loss) and
        # forward_backward_custom runs it here, in one forward_backward, instead of a forward, the loss in
        # the client, and a second pass with its gradient
        return tt.ClientConfigResponse(pjwt_auth_enabled=False, use_pyqwest_transport=False,
                                       sample_use_retrieve_futures=True, custom_loss_server_side=True,
                                       sample_join_sampling_session=False).model_dump()

    @r.post("/api/v1/client/dynamic_config")
    async def client_dynamic_config(request: Request):
        rq.tenant_of(request)
        return tt.ClientDynamicConfigResponse().model_dump()

    @r.post("/api/v1/telemetry")
    async def telemetry(request: Request):
        rq.tenant_of(request)
        await rq.body(request, TELEMETRY_MAX_BYTES)
        return {"status": "accepted"}

    @r.get("/api/v1/get_server_capabilities")
    async def capabilities(request: Request):
        rq.tenant_of(request)
        return svc.capabilities()

    # ---- sessions -------------------------------------------------------------------------------------

    @r.post("/api/v1/create_session")
    async def create_session(request: Request):
        tenant, req = await rq.read(request, tt.CreateSessionRequest)
        return {"type": "create_session", "session_id": svc.sessions.create(tenant, req)}

    @r.post("/api/v1/session_heartbeat")
    async def heartbeat(request: Request):
        tenant, req = await rq.read(request, tt.SessionHeartbeatRequest)
        svc.sessions.touch(tenant, req.session_id)
        return {"type": "session_heartbeat"}

    @r.post("/api/v1/sessions/{session_id}/finish")
    async def finish_session(session_id: str, request: Request):
        """The SDK's ServiceClient.close(): the session's models are deleted, its heartbeats answer 410.
        The body says how the client ended (``{"reason": {"type": "success"}, "detail": ...}``); none: success."""
        tenant = rq.tenant_of(request)
        body = await rq.body(request)
        try:
            finish = json.loads(body) if body else {}
            reason, detail = (finish.get("reason") or {}).get("type", "success"), finish.get("detail")
        except (ValueError, AttributeError):
            raise HTTPError(400, 'finish body: allowed: {"reason": {"type": "success" | "errored" | '
                                 '"interrupted"}, "detail": <text> or null}') from None
        svc.sessions.finish(tenant, session_id, reason, detail if isinstance(detail, str) else None)
        return {}

    @r.get("/api/v1/sessions/{session_id}")
    async def get_session(session_id: str, request: Request):
        return svc.sessions.view(rq.tenant_of(request), session_id).model_dump(mode="json")

    @r.get("/api/v1/sessions")
    async def list_sessions(request: Request):
        tenant = rq.tenant_of(request)
        scope = request.query_params.get("access_scope", "owned")
        if scope not in ("owned", "accessible"):  # one tenant sees its own sessions either way
            raise HTTPError(400, f"access_scope={scope!r}; allowed: owned, accessible")
        return tt.ListSessionsResponse(sessions=svc.sessions.ids(tenant, *page(request))).model_dump()

    @r.post("/api/v1/sessions/search")
    async def search_sessions(request: Request):
        tenant, req = await rq.read(request, tt.SessionSearchRequest)
        return svc.sessions.search(tenant, req, svc.checkpoints.store).model_dump(mode="json")

    @r.put("/api/v1/sessions/{session_id}/project")
    async def assign_session_project(session_id: str, request: Request):
        tenant = rq.tenant_of(request)
        try:
            project_id = json.loads(await rq.body(request) or b"{}").get("project_id")
        except (ValueError, AttributeError):
            raise HTTPError(400, 'body: allowed: {"project_id": <a non-empty string>}') from None
        svc.sessions.set_project(tenant, session_id, project_id)
        return {}

    # ---- who is asking -------------------------------------------------------------------------------

    @r.get("/api/v1/auth/apikey/me")
    async def api_key_me(request: Request):
        """``tinker auth login`` checks a key here: colo names the key's tenant (nothing secret)."""
        tenant = rq.tenant_of(request)
        return SelfApiKeyResponse(
            key_id=zlib.crc32(tenant.encode()), name=tenant,
            note=f"a colo API key of tenant {tenant!r} (COLO_API_KEYS)" if not svc.tenants.open else
                 "colo runs open (no COLO_API_KEYS): every key is tenant 'default'",
            details={"org_details": {"name": "colo"}, "user_details": {"email": tenant}}).model_dump()

    # ---- futures --------------------------------------------------------------------------------------

    @r.post("/api/v1/retrieve_future")
    async def retrieve_future(request: Request):
        tenant, req = await rq.read(request, tt.FutureRetrieveRequest)
        item = await svc.futures.retrieve(tenant, req.request_id)
        if item is None:
            # still running: 408 with the try_again body makes the SDK poll again at once and quietly
            # (a 200 try_again would log a warning on every poll of a long job)
            return JSONResponse({"type": "try_again", "request_id": req.request_id, "queue_state": "active"},
                                status_code=408)
        error = item.future.exception()
        if error is not None:
            user = isinstance(error, ColoError) and not isinstance(error, EngineError)
            message = str(error) if isinstance(error, ColoError) else f"{type(error).__name__}: {error}"
            return {"error": message, "category": "user" if user else "server"}
        body, kind = item.encode(item.future.result())
        if kind == "proto":
            return Response(body, media_type=PROTO)
        return body

    @r.post("/api/v1/retrieve_futures")
    async def retrieve_futures(request: Request):
        """The SDK's session poller (``sample_use_retrieve_futures``): which of a sampling client's
        requests finished or failed since ``prev_cursor``, waiting up to ``timeout`` (default and at most
        ``POLL_SECONDS``; 0 answers at once). The payloads are fetched by ``retrieve_future``."""
        tenant, req = await rq.read(request, tt.FuturesRetrieveRequest)
        if req.prev_cursor < 0 or (req.timeout is not None and not 0 <= req.timeout):
            raise HTTPError(400, f"prev_cursor={req.prev_cursor}, timeout={req.timeout}; allowed: prev_cursor >= 0, "
                                 f"timeout >= 0 or null (colo waits at most {POLL_SECONDS:.0f} s)")
        target = req.target
        svc.sampling.get(tenant, target.sampling_session_id)  # another tenant's session reads as unknown
        timeout = POLL_SECONDS if req.timeout is None else min(req.timeout, POLL_SECONDS)
        # retrieved_request_ids needs nothing: results are kept as retrieve_future keeps them
        done, cursor = await svc.futures.retrieve_many(
            tenant, (target.sampling_session_id, target.cloned_sampler_id), req.prev_cursor, timeout)
        completions = [tt.FutureFailed(request_id=c.request_id) if c.failed else tt.FutureFinished(request_id=c.request_id)
                       for c in done]
        return tt.FuturesRetrieveResponse(completions=completions, cursor=cursor).model_dump(mode="json",
                                                                                           exclude_none=True)

    @r.post("/api/v1/cancel_future")
    async def cancel_future(request: Request):
        rq.tenant_of(request)
        await rq.body(request)
        return {}

    return r
