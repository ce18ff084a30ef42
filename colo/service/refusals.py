"""The Tinker API routes colo knows and refuses, each with why: what has no meaning on one machine
(billing, the audit log, JWT exchange, trace export, ...).

Each answers 403 with ``{detail}`` naming the route and the reason, so the SDK raises
``tinker.PermissionDeniedError`` with that text. Never a 5xx: the SDK retries those forever; nor 402,
408, 409 or 429, which it also waits on and retries. A path colo does not know at all gets the app's
catch-all 404 instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Request

from colo.service.errors import HTTPError
from colo.service.http import Requests

STATUS = 403


@dataclass(frozen=True)
class Refusal:
    method: str
    path: str  # FastAPI's pattern: {name} matches one path segment
    what: str
    why: str

    def message(self, path: str) -> str:
        return f"{self.method} {path} ({self.what}) is not served by colo: {self.why}"


NO_ACCOUNTS = ("colo runs on your own machine and keeps no usage accounts or prices; "
               "each checkpoint's size is in list_checkpoints/list_user_checkpoints (size_bytes)")

REFUSALS = (
    Refusal("GET", "/api/v1/billing/usage/events", "billing usage", NO_ACCOUNTS),
    Refusal("GET", "/api/v1/billing/usage/checkpoints/current", "checkpoint storage billing", NO_ACCOUNTS),
    Refusal("GET", "/api/v1/audit", "audit log",
            "colo has no organization, teams or projects whose changes it would log; the service log "
            "records the requests it served"),
    Refusal("POST", "/api/v1/auth/token", "JWT exchange",
            "colo checks the API key on every request (X-API-Key, from COLO_API_KEYS) and issues no tokens; "
            "its client config says pjwt_auth_enabled=false"),
    Refusal("DELETE", "/api/v1/auth/apikey/me", "API key deletion",
            "colo's keys are fixed by COLO_API_KEYS when the service starts; remove the key there and restart "
            "the service"),
    Refusal("GET", "/api/v1/sessions/{session_id}/trace_export", "session trace export",
            "colo records no per-request timeline to build a Perfetto trace from; its log (and "
            "/api/v1/healthz for what runs now) are what it has"),
)


def routes(rq: Requests) -> APIRouter:
    r = APIRouter()

    def refuser(refusal: Refusal):
        async def refuse(request: Request):
            rq.tenant_of(request)  # an unknown key is told so first, as on every route
            raise HTTPError(STATUS, refusal.message(request.url.path))
        return refuse

    for refusal in REFUSALS:
        r.add_api_route(refusal.path, refuser(refusal), methods=[refusal.method])
    return r
