"""The Tinker API over HTTP, so the official ``tinker`` SDK trains and samples on this machine.

``create_app`` puts the routes together (``routes_session``, ``routes_training``, ``routes_sampling``,
``routes_runs``, ``routes_weights``, and the OpenAI-compatible ``routes_openai``) over one ``Service``,
with the Tinker routes colo refuses (``refusals``: 403 and why) and a 404 for any other path; runs the
housekeeping timer (silent sessions reaped, expired checkpoints deleted), and on shutdown lets the
running job finish, answers the queued ones and releases the engine.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from colo.service import (refusals, routes_openai, routes_runs, routes_sampling, routes_session,
                          routes_training, routes_weights)
from colo.service.errors import HTTPError
from colo.service.http import Requests, add_error_handlers
from colo.service.server import Service

log = logging.getLogger(__name__)

HOUSEKEEPING_SECONDS = 30.0  # how often silent sessions are reaped and expired checkpoints deleted


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def housekeeping():
            while True:
                try:
                    service.housekeeping()
                except Exception:  # one failed round must not end the timer (an asyncio task dies silently)
                    log.exception("colo: housekeeping failed; trying again in %.0f s", HOUSEKEEPING_SECONDS)
                await asyncio.sleep(HOUSEKEEPING_SECONDS)

        task = asyncio.create_task(housekeeping())
        yield
        task.cancel()
        log.info("colo: shutting down: finishing the running job, answering queued ones")
        if not service.stop():
            log.error("colo: the running job did not finish in %.0f s (COLO_STALL_SECONDS); exiting without it",
                      service.trainer.config.stall_seconds)
            return
        log.info("colo: stopped cleanly")

    app = FastAPI(title="colo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    rq = Requests(service.tenants, service.trainer.config.max_body_mib << 20)
    for group in (routes_session, routes_training, routes_sampling, routes_runs, routes_weights, routes_openai):
        app.include_router(group.routes(service, rq))
    app.include_router(refusals.routes(rq))

    refused = {(x.method, x.path) for x in refusals.REFUSALS}
    served = sorted({f"{m} {r.path}" for r in app.routes for m in getattr(r, "methods", ())
                     if m != "HEAD" and (m, r.path) not in refused})
    service.routes = served
    service.refused = [f"{x.method} {x.path}: {x.what} ({x.why})" for x in refusals.REFUSALS]

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def not_served(path: str, request: Request):
        # a path no Tinker or OpenAI client of colo's SDK versions calls (or a method it does not take
        # there); 4xx, since the SDK retries a 5xx forever
        raise HTTPError(404, f"{request.method} /{path} is not served by colo: it is not a route of the Tinker "
                             f"API (SDK 0.38) or the OpenAI API that colo knows; served: {', '.join(served)}")

    return app
