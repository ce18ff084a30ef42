"""Routes of the service itself: health, client configuration, sessions, and request futures.

A job's POST answers ``{request_id}`` at once; the client polls ``retrieve_future``. A failed job
answers 200 with ``{error, category}`` (the SDK retries any 5xx forever): "user" for the caller's own
mistakes, "server" for the engine's.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from tinker import types as tt

from colo.errors import ColoError, EngineError
from colo.service.http import PROTO, Requests
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
        # sampling results are polled one request at a time (no session completion queue), and
        # custom losses run in the client: the endpoints those flags would need are not served
        return tt.ClientConfigResponse(pjwt_auth_enabled=False, use_pyqwest_transport=False,
                                       sample_use_retrieve_futures=False, custom_loss_server_side=False,
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
        return svc.base.capabilities()

    # ---- sessions -------------------------------------------------------------------------------------

    @r.post("/api/v1/create_session")
    async def create_session(request: Request):
        tenant = rq.tenant_of(request)
        await rq.parse(request, tt.CreateSessionRequest)
        return {"type": "create_session", "session_id": svc.sessions.create(tenant)}

    @r.post("/api/v1/session_heartbeat")
    async def heartbeat(request: Request):
        tenant, req = await rq.read(request, tt.SessionHeartbeatRequest)
        svc.sessions.touch(tenant, req.session_id)
        return {"type": "session_heartbeat"}

    @r.post("/api/v1/sessions/{session_id}/finish")
    async def finish_session(session_id: str, request: Request):
        """The SDK's ServiceClient.close(): the session's models are deleted, its heartbeats answer 410."""
        tenant = rq.tenant_of(request)
        await rq.body(request)
        svc.sessions.finish(tenant, session_id)
        return {}

    @r.get("/api/v1/sessions/{session_id}")
    async def get_session(session_id: str, request: Request):
        models, samplers = svc.sessions.view(rq.tenant_of(request), session_id)
        return tt.GetSessionResponse(training_run_ids=models, sampler_ids=samplers).model_dump()

    @r.get("/api/v1/sessions")
    async def list_sessions(request: Request):
        return tt.ListSessionsResponse(sessions=svc.sessions.ids(rq.tenant_of(request))).model_dump()

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

    @r.post("/api/v1/cancel_future")
    async def cancel_future(request: Request):
        rq.tenant_of(request)
        await rq.body(request)
        return {}

    return r
