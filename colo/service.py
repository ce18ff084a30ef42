"""The Tinker API over HTTP, so the official ``tinker`` SDK trains and samples on this machine.

A thin layer: it checks who is asking (``colo.tenants``), parses the request (``colo.tinker_wire``,
the SDK's own request types), hands the work to the one thread that owns the Trainer
(``colo.worker``) and answers ``{request_id}``; the client then polls ``retrieve_future``
(``colo.futures``). A failed job answers 200 with ``{error, category}`` (the SDK retries any 5xx
forever); a malformed request answers 4xx with a message, and nothing about it reaches the Trainer.
"""

from __future__ import annotations

import asyncio
import json as json_module
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from tinker import types as tt

from colo import default_model, tinker_wire
from colo.checkpoint import read_lora
from colo.checkpoint_store import CheckpointStore, Stored
from colo.errors import ColoError, EngineError, InvalidRequestError
from colo.futures import Futures
from colo.stability import StabilityRecords
from colo.tenants import Tenants
from colo.trainer import Trainer
from colo.types import AdamParams, SampleJob
from colo.worker import Worker

log = logging.getLogger(__name__)

TELEMETRY_MAX_BYTES = 1 << 20  # the SDK's usage reports: small JSON documents, read and dropped
SEEN_PER_MODEL = 4096  # answered seq_ids remembered per model, for POSTs the SDK sends again
EPHEMERAL_KEPT = 4  # unnamed sampler snapshots kept per model
SESSION_TTL_SECONDS = 120.0  # a session silent this long (the SDK beats every 10 s) loses its models
HOUSEKEEPING_SECONDS = 30.0  # how often silent sessions are reaped and expired checkpoints deleted
PROTO = "application/x-protobuf"


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Session:
    tenant: str
    last_seen: float
    models: set[str] = field(default_factory=set)
    samplers: set[str] = field(default_factory=set)
    finished: bool = False  # closed by its client: heartbeats answer 410, as Tinker's do


@dataclass
class Model:
    tenant: str
    model_id: str
    adapter: str
    rank: int
    last_request: float = field(default_factory=time.time)


@dataclass
class Sampler:
    """What a sampling session samples: the base model, a model's live weights, or a saved version."""

    tenant: str
    sampler_id: str
    model_path: str | None = None
    model_id: str | None = None
    version: int | None = None  # the version saved at model_path (None: follow the live weights)
    file: Path | None = None
    clients: int = 0


class Service:
    def __init__(self, trainer: Trainer, tenants: Tenants, checkpoints: CheckpointStore,
                 model_name: str | None = None) -> None:
        self.trainer = trainer
        self.worker = Worker(trainer)
        self.tenants = tenants
        self.checkpoints = checkpoints
        self.futures = Futures()
        self.stability = StabilityRecords()
        configured = model_name or trainer.config.model
        self.model_name = default_model.HUB_ID if default_model.is_default(configured) else configured
        # names a client may use for the base model: the served name, the short name, the local path
        self.base_names = {self.model_name, configured, trainer.model_path}
        if default_model.is_default(configured):
            self.base_names.add(default_model.NAME)
        self.arch = next(iter(trainer.policy._base.config.architectures or []), "unknown")
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, Model] = {}
        self.samplers: dict[str, Sampler] = {}
        self.frozen: dict[Path, str] = {}  # a saved version no longer live -> the adapter holding it
        self.saved: dict[Path, tuple[str, int]] = {}  # file -> (model_id, version) saved by this server
        self.seen: dict[str, dict[int, str]] = {}  # model_id -> seq_id -> request_id, for retried POSTs
        self.lock = threading.Lock()
        self.stopping = False
        self.stopped = False

    # ---- lookups: another tenant's ids read as unknown --------------------------------------------

    def session(self, tenant: str, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None or s.tenant != tenant:
            raise HTTPError(404, f"unknown session {session_id!r}; create_session makes one")
        if s.finished:
            raise HTTPError(410, f"session {session_id!r} was finished; create_session makes a new one")
        s.last_seen = time.monotonic()
        return s

    def model(self, tenant: str, model_id: str) -> Model:
        m = self.models.get(model_id)
        if m is None or m.tenant != tenant:
            raise HTTPError(404, f"unknown model {model_id!r}; create_model makes one")
        return m

    def sampler(self, tenant: str, sampler_id: str) -> Sampler:
        s = self.samplers.get(sampler_id)
        if s is None or s.tenant != tenant:
            raise HTTPError(404, f"unknown sampling session {sampler_id!r}; create_sampling_session makes one")
        return s

    def check_base_model(self, base_model: str | None) -> None:
        if base_model is not None and base_model not in self.base_names:
            raise HTTPError(400, f"base_model {base_model!r} is not served here; allowed: {self.model_name!r}")

    # ---- futures ----------------------------------------------------------------------------------

    def submit(self, tenant: str, future, encode: Callable[[Any], tuple[bytes | dict, str]]) -> dict:
        return {"request_id": self.futures.add(tenant, future, encode)}

    def ordered(self, tenant: str, model: Model, seq_id: int | None, fn, encode) -> dict:
        if seq_id is None:
            raise HTTPError(400, "seq_id is missing; allowed: the training client's request counter + 1")
        model.last_request = time.time()
        with self.lock:
            seen = self.seen.setdefault(model.model_id, {})
            if seq_id in seen:  # the SDK re-sent a POST whose answer it lost
                return {"request_id": seen[seq_id]}
            try:
                future = self.worker.ordered(model.model_id, seq_id, fn)
            except ColoError as e:
                raise HTTPError(400, str(e)) from None
            answer = self.submit(tenant, future, encode)
            seen[seq_id] = answer["request_id"]
            if len(seen) > SEEN_PER_MODEL:  # a retry comes within seconds: forget the oldest half
                for old in sorted(seen)[: SEEN_PER_MODEL // 2]:
                    del seen[old]
        return answer

    # ---- sessions and models ------------------------------------------------------------------------

    def reap_sessions(self) -> None:
        """Delete the models of sessions whose client stopped beating, to free their adapters."""
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if now - s.last_seen > SESSION_TTL_SECONDS:
                if not s.finished:
                    log.info("session %s is silent for %.0f s; deleting its %d models", sid, now - s.last_seen,
                             len(s.models))
                self.finish_session(s)
                del self.sessions[sid]

    def finish_session(self, s: Session) -> None:
        for model_id in list(s.models):
            self.drop_model(model_id)
        s.models.clear()
        s.finished = True

    def expire_checkpoints(self) -> None:
        """Runs on the worker, which writes checkpoints, so a save and a deletion never meet."""
        for file in self.checkpoints.expire():
            self.saved.pop(file, None)
            log.info("checkpoint %s expired (ttl_seconds); deleted", file)

    # ---- training runs and their checkpoints --------------------------------------------------------

    def checkpoint_view(self, c: Stored) -> tt.Checkpoint:
        return tt.Checkpoint(
            checkpoint_id=f"{c.kind}/{c.name}", checkpoint_type="training" if c.kind == "weights" else "sampler",
            time=_utc(c.created), tinker_path=CheckpointStore.tinker_path(c.model_id, c.kind, c.name),
            size_bytes=c.size_bytes, expires_at=_utc(c.expires_at) if c.expires_at is not None else None)

    def training_run(self, tenant: str, model_id: str) -> tt.TrainingRun:
        """A live model of this tenant, or one whose checkpoints are on disk (an earlier run)."""
        m = self.models.get(model_id)
        live = m if m is not None and m.tenant == tenant else None
        stored = self.checkpoints.list(tenant, model_id) if model_id in self.checkpoints.models_on_disk(tenant) else []
        if live is None and not stored:
            raise HTTPError(404, f"unknown training run {model_id!r}; allowed: a model_id of this tenant")
        training = [c for c in stored if c.kind == "weights"]
        sampler = [c for c in stored if c.kind == "sampler_weights"]
        rank = live.rank if live else next((lora.rank for c in reversed(stored) if (lora := read_lora(c.file))), None)
        last = live.last_request if live else max(c.created for c in stored)
        return tt.TrainingRun(training_run_id=model_id, base_model=self.model_name, model_owner=tenant, is_lora=True,
                              lora_rank=rank, last_request_time=_utc(last),
                              last_checkpoint=self.checkpoint_view(training[-1]) if training else None,
                              last_sampler_checkpoint=self.checkpoint_view(sampler[-1]) if sampler else None)

    def run_ids(self, tenant: str) -> list[str]:
        live = [m.model_id for m in self.models.values() if m.tenant == tenant]
        return sorted(set(live) | set(self.checkpoints.models_on_disk(tenant)))

    def drop_model(self, model_id: str):
        """Forget the model now; its adapters (live and frozen copies) are deleted by the returned job."""
        m = self.models.pop(model_id, None)
        self.worker.close_order(model_id)
        with self.lock:
            self.seen.pop(model_id, None)
        frozen = [f for f in self.frozen if f.parent.parent.name == model_id]

        def delete(trainer: Trainer) -> str:
            for adapter in ([m.adapter] if m else []) + [self.frozen.pop(f) for f in frozen if f in self.frozen]:
                if adapter in trainer.adapters:
                    trainer.delete_lora(adapter)
            return model_id

        return self.worker.call(delete)

    def check_quota(self, tenant: str) -> None:
        """Runs on the worker, where models are added, so concurrent creations cannot both pass."""
        held = sum(1 for m in self.models.values() if m.tenant == tenant)
        limit = self.trainer.config.max_models_per_tenant
        if held >= limit:
            raise InvalidRequestError(f"this tenant holds {held} models; allowed: at most {limit} "
                                      "(COLO_MAX_MODELS_PER_TENANT); unload_model one first")

    def prune_ephemeral(self, trainer: Trainer, folder: Path, keep: int = EPHEMERAL_KEPT) -> None:
        """Unnamed sampler snapshots are for the next rollouts: keep a model's newest few on disk."""
        files = sorted(folder.glob("ephemeral-*.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
        for old in files[keep:]:
            old.unlink(missing_ok=True)
            self.saved.pop(old, None)
            adapter = self.frozen.pop(old, None)
            if adapter in trainer.adapters:
                trainer.delete_lora(adapter)

    def add_model(self, tenant: str, session: Session, model_id: str, adapter: str, rank: int) -> None:
        self.models[model_id] = Model(tenant, model_id, adapter, rank)
        session.models.add(model_id)
        self.worker.open_order(model_id, first_seq=1)

    # ---- sampling -----------------------------------------------------------------------------------

    def resolve_adapter(self, trainer: Trainer, s: Sampler) -> str | None:
        """Runs on the worker: the adapter that holds exactly the weights ``s`` samples."""
        if s.model_id is None and s.file is None:
            return None
        m = self.models.get(s.model_id) if s.model_id else None
        if m is not None and m.adapter in trainer.adapters and (s.version is None or
                                                                 trainer.version(m.adapter) == s.version):
            return m.adapter
        if s.file is None:
            raise InvalidRequestError(f"model {s.model_id} of this sampling session was deleted")
        adapter = self.frozen.get(s.file)
        if adapter is None or adapter not in trainer.adapters:
            if not s.file.is_file():
                raise InvalidRequestError(f"checkpoint {s.model_path} no longer exists")
            for old_file, old in list(self.frozen.items()):  # one frozen copy per sampler's model
                if old_file.parent == s.file.parent and old in trainer.adapters:
                    trainer.delete_lora(old)
                    del self.frozen[old_file]
            adapter = trainer.load_state(s.file)
            self.frozen[s.file] = adapter
        return adapter


# ---- HTTP ---------------------------------------------------------------------------------------------


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def housekeeping():
            while True:
                service.reap_sessions()
                service.worker.call(lambda trainer: service.expire_checkpoints())
                await asyncio.sleep(HOUSEKEEPING_SECONDS)

        task = asyncio.create_task(housekeeping())
        yield
        task.cancel()
        log.info("colo: shutting down: finishing the running job, answering queued ones")
        service.stopping = True
        limit = service.trainer.config.stall_seconds
        if not service.worker.stop(timeout=limit):
            log.error("colo: the running job did not finish in %.0f s (COLO_STALL_SECONDS); exiting without it", limit)
            return
        service.trainer.close()
        service.stopped = True
        log.info("colo: stopped cleanly")

    app = FastAPI(title="colo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    svc = service

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError):
        return JSONResponse({"detail": str(e)}, status_code=e.status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(e).__name__}"}, status_code=500)

    def tenant_of(request: Request) -> str:
        tenant = svc.tenants.tenant_of(request.headers.get("x-api-key"))
        if tenant is None:
            raise HTTPError(401, "missing or unknown API key (X-API-Key); allowed: a key from COLO_API_KEYS")
        return tenant

    max_body = svc.trainer.config.max_body_mib << 20

    async def body_of(request: Request, limit: int = max_body) -> bytes:
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

    async def parse(request: Request, model: type[pydantic.BaseModel]):
        body = await body_of(request)
        try:
            return model.model_validate_json(body or b"{}")
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "body"
            more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
            raise HTTPError(400, f"{model.__name__}: {where}: {err['msg']}{more}") from None

    def json(obj: pydantic.BaseModel) -> tuple[dict, str]:
        return obj.model_dump(mode="json", exclude_none=True), "json"

    # ---- service --------------------------------------------------------------------------------------

    @app.get("/api/v1/healthz")
    @app.get("/healthz")
    async def healthz():
        """200 while the worker moves; 503 with a reason when it has work and finished none of it for
        COLO_STALL_SECONDS, or when the service is stopping. The body shows what runs and what waits."""
        st = svc.worker.status()
        limit = svc.trainer.config.stall_seconds
        view = {"running": st.running, "running_seconds": round(st.running_seconds, 1), "queued": st.queued,
                "seconds_since_progress": round(st.seconds_since_progress, 1)}
        if svc.stopping:
            return JSONResponse({"status": "stopping", "reason": "the service is shutting down", "worker": view},
                                status_code=503)
        if st.stalled(limit):
            what = f"a {st.running} job has run for {st.running_seconds:.0f} s" if st.running else "nothing ran"
            return JSONResponse({"status": "stalled", "worker": view,
                                 "reason": f"the worker has queued work and finished none of it for "
                                           f"{st.seconds_since_progress:.0f} s ({what}); allowed: "
                                           f"{limit:.0f} s (COLO_STALL_SECONDS)"}, status_code=503)
        return {"status": "ok", "worker": view}

    @app.post("/api/v1/client/config")
    async def client_config(request: Request):
        tenant_of(request)
        # sampling results are polled one request at a time (no session completion queue), and
        # custom losses run in the client: the endpoints those flags would need are not served
        return tt.ClientConfigResponse(pjwt_auth_enabled=False, use_pyqwest_transport=False,
                                       sample_use_retrieve_futures=False, custom_loss_server_side=False,
                                       sample_join_sampling_session=False).model_dump()

    @app.post("/api/v1/client/dynamic_config")
    async def client_dynamic_config(request: Request):
        tenant_of(request)
        return tt.ClientDynamicConfigResponse().model_dump()

    @app.post("/api/v1/telemetry")
    async def telemetry(request: Request):
        tenant_of(request)
        await body_of(request, TELEMETRY_MAX_BYTES)  # the SDK's usage reports: read and dropped
        return {"status": "accepted"}

    @app.get("/api/v1/get_server_capabilities")
    async def capabilities(request: Request):
        tenant_of(request)
        return {"supported_models": [{"model_name": svc.model_name, "max_context_length": svc.trainer.max_len,
                                      "trainable": True, "sampleable": True}]}

    @app.post("/api/v1/create_session")
    async def create_session(request: Request):
        tenant = tenant_of(request)
        await parse(request, tt.CreateSessionRequest)
        session_id = uuid.uuid4().hex
        svc.sessions[session_id] = Session(tenant, time.monotonic())
        return {"type": "create_session", "session_id": session_id}

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(request: Request):
        tenant = tenant_of(request)
        req = await parse(request, tt.SessionHeartbeatRequest)
        svc.session(tenant, req.session_id)
        return {"type": "session_heartbeat"}

    @app.post("/api/v1/sessions/{session_id}/finish")
    async def finish_session(session_id: str, request: Request):
        """The SDK's ServiceClient.close(): the session's models are deleted, its heartbeats answer 410."""
        tenant = tenant_of(request)
        await body_of(request)
        s = svc.sessions.get(session_id)
        if s is None or s.tenant != tenant:
            raise HTTPError(404, f"unknown session {session_id!r}")
        svc.finish_session(s)  # a second finish changes nothing (first wins, as in Tinker)
        return {}

    @app.get("/api/v1/sessions/{session_id}")
    async def get_session(session_id: str, request: Request):
        tenant = tenant_of(request)
        s = svc.sessions.get(session_id)
        if s is None or s.tenant != tenant:
            raise HTTPError(404, f"unknown session {session_id!r}")
        return tt.GetSessionResponse(training_run_ids=sorted(s.models), sampler_ids=sorted(s.samplers)).model_dump()

    @app.get("/api/v1/sessions")
    async def list_sessions(request: Request):
        tenant = tenant_of(request)
        return tt.ListSessionsResponse(sessions=[sid for sid, s in svc.sessions.items() if s.tenant == tenant]).model_dump()

    # ---- models ---------------------------------------------------------------------------------------

    @app.post("/api/v1/create_model")
    async def create_model(request: Request):
        tenant = tenant_of(request)
        req = await parse(request, tt.CreateModelRequest)
        session = svc.session(tenant, req.session_id)
        svc.check_base_model(req.base_model)
        if req.optimizer_config.type != "adamw":
            raise HTTPError(400, f"optimizer {req.optimizer_config.type!r}; allowed: adamw")
        if req.lora_config is None:
            raise HTTPError(400, "lora_config is missing; colo trains LoRA adapters only")
        model_id = f"{req.session_id}:train:{req.model_seq_id}"
        if model_id in svc.models:
            raise HTTPError(400, f"model_seq_id {req.model_seq_id} was already used in this session")
        svc.reap_sessions()
        lora = req.lora_config

        def run(trainer: Trainer) -> str:
            svc.check_quota(tenant)
            adapter = trainer.create_lora(rank=lora.rank, seed=lora.seed, train_attn=lora.train_attn,
                                          train_mlp=lora.train_mlp, train_unembed=lora.train_unembed)
            svc.add_model(tenant, session, model_id, adapter, lora.rank)
            return model_id

        return svc.submit(tenant, svc.worker.call(run), lambda mid: json(tt.CreateModelResponse(model_id=mid)))

    @app.post("/api/v1/get_info")
    async def get_info(request: Request):
        tenant = tenant_of(request)
        req = await parse(request, tt.GetInfoRequest)
        m = svc.model(tenant, req.model_id)
        return {"type": "get_info", "model_id": m.model_id, "is_lora": True, "lora_rank": m.rank,
                "model_name": svc.model_name,
                "model_data": {"arch": svc.arch, "model_name": svc.model_name,
                               "tokenizer_id": svc.trainer.model_path}}

    @app.post("/api/v1/unload_model")
    async def unload_model(request: Request):
        tenant = tenant_of(request)
        req = await parse(request, tt.UnloadModelRequest)
        m = svc.model(tenant, req.model_id)
        for s in svc.sessions.values():
            s.models.discard(m.model_id)
        return svc.submit(tenant, svc.drop_model(m.model_id),
                          lambda mid: json(tt.UnloadModelResponse(model_id=mid, type="unload_model")))

    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request):
        tenant = tenant_of(request)
        if PROTO not in request.headers.get("content-type", ""):
            raise HTTPError(415, f"forward_backward takes {PROTO} (the SDK's ForwardBackwardRequest)")
        try:
            body = tinker_wire.decompress(await body_of(request), request.headers.get("content-encoding"))
            call = tinker_wire.parse_forward_backward(body)
        except InvalidRequestError as e:
            raise HTTPError(400, str(e)) from None
        m = svc.model(tenant, call.model_id)
        verb = Trainer.forward if call.forward_only else Trainer.forward_backward

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
            return verb(trainer, m.adapter, call.data, call.loss_fn, call.loss_fn_config)

        return svc.ordered(tenant, m, call.seq_id, run,
                           lambda out: (tinker_wire.forward_backward_output(out), "proto"))

    @app.post("/api/v1/optim_step")
    async def optim_step(request: Request):
        tenant = tenant_of(request)
        req = await parse(request, tt.OptimStepRequest)
        m = svc.model(tenant, req.model_id)
        p = req.optim_params
        if not isinstance(p, tt.AdamParams):
            raise HTTPError(400, f"optimizer {getattr(p, 'type', '?')!r}; allowed: adam_params")
        adam = AdamParams(learning_rate=p.learning_rate, beta1=p.beta1, beta2=p.beta2, eps=p.eps,
                          weight_decay=p.weight_decay, grad_clip_norm=p.grad_clip_norm)
        return svc.ordered(tenant, m, req.seq_id, lambda t: t.optim_step(m.adapter, adam),
                           lambda out: json(tt.OptimStepResponse(metrics=out.metrics)))

    # ---- checkpoints ----------------------------------------------------------------------------------

    @app.post("/api/v1/save_weights")
    async def save_weights(request: Request):
        tenant = tenant_of(request)
        req = await parse(request, tt.SaveWeightsRequest)
        m = svc.model(tenant, req.model_id)
        name = req.path or f"step-{uuid.uuid4().hex[:8]}"
        file = checked(lambda: svc.checkpoints.file(tenant, m.model_id, "weights", name))
        ttl = checked_ttl(req.ttl_seconds)
        overwrite = req.overwrite

        def run(trainer: Trainer) -> str:
            if file.exists() and not overwrite:
                raise InvalidRequestError(f"checkpoint {name!r} exists; allowed: a new name, or overwrite=True")
            svc.checkpoints.sweep(svc.checkpoints.root / tenant)
            svc.expire_checkpoints()
            trainer.save_state(m.adapter, file, optimizer=True)
            CheckpointStore.set_ttl(file, ttl)
            return CheckpointStore.tinker_path(m.model_id, "weights", name)

        return svc.ordered(tenant, m, req.seq_id, run, lambda path: json(tt.SaveWeightsResponse(path=path)))

    @app.post("/api/v1/load_weights")
    async def load_weights(request: Request):
        tenant = tenant_of(request)
        req = await parse(request, tt.LoadWeightsRequest)
        _, _, _, file = checked(lambda: svc.checkpoints.parse(tenant, req.path))
        if not file.is_file():
            raise HTTPError(404, f"no checkpoint {req.path!r} for this tenant")
        with_optimizer = req.optimizer

        def load(trainer: Trainer, adapter: str | None) -> str:
            return trainer.load_state(file, adapter=adapter, optimizer=with_optimizer)

        if req.session_id is not None:  # a new model, created from the checkpoint
            session = svc.session(tenant, req.session_id)
            svc.check_base_model(req.base_model)
            model_id = f"{req.session_id}:train:{req.model_seq_id}"
            if model_id in svc.models:
                raise HTTPError(400, f"model_seq_id {req.model_seq_id} was already used in this session")
            svc.reap_sessions()

            def create(trainer: Trainer) -> str:
                svc.check_quota(tenant)
                adapter = load(trainer, None)
                svc.add_model(tenant, session, model_id, adapter, trainer.adapters[adapter].lora.rank)
                return model_id

            return svc.submit(tenant, svc.worker.call(create),
                              lambda mid: json(tt.LoadWeightsResponse(path=req.path, model_id=mid)))
        if req.model_id is None:
            raise HTTPError(400, "load_weights needs model_id (with seq_id) or session_id (with model_seq_id)")
        m = svc.model(tenant, req.model_id)
        return svc.ordered(tenant, m, req.seq_id, lambda t: load(t, m.adapter),
                           lambda _: json(tt.LoadWeightsResponse(path=req.path, model_id=m.model_id)))

    @app.post("/api/v1/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request):
        tenant = tenant_of(request)
        req = await parse(request, tt.SaveWeightsForSamplerRequest)
        m = svc.model(tenant, req.model_id)
        named = req.path is not None
        name = req.path if named else f"ephemeral-{uuid.uuid4().hex[:12]}"
        file = checked(lambda: svc.checkpoints.file(tenant, m.model_id, "sampler_weights", name))
        path = CheckpointStore.tinker_path(m.model_id, "sampler_weights", name)
        inflight = req.kind == "inflight"
        ttl = checked_ttl(req.ttl_seconds)

        def run(trainer: Trainer) -> tt.SaveWeightsForSamplerResponseInternal:
            version = trainer.version(m.adapter)
            svc.checkpoints.sweep(svc.checkpoints.root / tenant)
            svc.expire_checkpoints()
            trainer.save_state(m.adapter, file, optimizer=False)
            CheckpointStore.set_ttl(file, ttl)
            svc.saved[file] = (m.model_id, version)
            if named:
                return tt.SaveWeightsForSamplerResponseInternal(path=path)
            svc.prune_ephemeral(trainer, file.parent)
            sampler_id = uuid.uuid4().hex
            svc.samplers[sampler_id] = Sampler(tenant, sampler_id, path, m.model_id,
                                               None if inflight else version, file)
            return tt.SaveWeightsForSamplerResponseInternal(sampling_session_id=sampler_id)

        return svc.ordered(tenant, m, req.seq_id, run, json)

    # ---- training runs (REST) ---------------------------------------------------------------------------

    def page(request: Request) -> tuple[int, int]:
        try:
            limit = int(request.query_params.get("limit", 20))
            offset = int(request.query_params.get("offset", 0))
        except ValueError:
            raise HTTPError(400, "limit and offset must be integers") from None
        if not (1 <= limit <= 1000 and offset >= 0):
            raise HTTPError(400, f"limit={limit}, offset={offset}; allowed: limit in [1, 1000], offset >= 0")
        return limit, offset

    @app.get("/api/v1/training_runs")
    async def list_training_runs(request: Request):
        tenant = tenant_of(request)
        limit, offset = page(request)
        ids = svc.run_ids(tenant)
        runs = [svc.training_run(tenant, i) for i in ids[offset: offset + limit]]
        return tt.TrainingRunsResponse(training_runs=runs, cursor=tt.Cursor(offset=offset, limit=limit,
                                                                            total_count=len(ids))).model_dump(mode="json")

    @app.get("/api/v1/training_runs/{model_id}")
    async def get_training_run(model_id: str, request: Request):
        return svc.training_run(tenant_of(request), model_id).model_dump(mode="json")

    @app.get("/api/v1/training_runs/{model_id}/checkpoints")
    async def list_checkpoints(model_id: str, request: Request):
        tenant = tenant_of(request)
        checked(lambda: svc.checkpoints.file(tenant, model_id, "weights", "x"))  # the id's pattern
        stored = svc.checkpoints.list(tenant, model_id)
        return tt.CheckpointsListResponse(checkpoints=[svc.checkpoint_view(c) for c in stored]).model_dump(mode="json")

    @app.get("/api/v1/checkpoints")
    async def list_user_checkpoints(request: Request):
        tenant = tenant_of(request)
        limit, offset = page(request)
        stored = sorted((c for m in svc.checkpoints.models_on_disk(tenant) for c in svc.checkpoints.list(tenant, m)),
                        key=lambda c: c.created, reverse=True)
        return tt.CheckpointsListResponse(
            checkpoints=[svc.checkpoint_view(c) for c in stored[offset: offset + limit]],
            cursor=tt.Cursor(offset=offset, limit=limit, total_count=len(stored))).model_dump(mode="json")

    def stored_file(tenant: str, model_id: str, kind: str, name: str) -> Path:
        file = checked(lambda: svc.checkpoints.file(tenant, model_id, kind, name))
        if not file.is_file():
            raise HTTPError(404, f"no checkpoint {kind}/{name} of training run {model_id!r} for this tenant")
        return file

    @app.delete("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}")
    async def delete_checkpoint(model_id: str, kind: str, name: str, request: Request):
        tenant = tenant_of(request)
        file = stored_file(tenant, model_id, kind, name)

        def delete(trainer: Trainer) -> None:  # on the worker, which writes checkpoints
            svc.checkpoints.delete(file)
            svc.saved.pop(file, None)

        await asyncio.wrap_future(svc.worker.call(delete))
        return {}

    @app.put("/api/v1/training_runs/{model_id}/checkpoints/{kind}/{name}/ttl")
    async def set_checkpoint_ttl(model_id: str, kind: str, name: str, request: Request):
        tenant = tenant_of(request)
        file = stored_file(tenant, model_id, kind, name)
        try:
            ttl = json_module.loads(await body_of(request) or b"{}").get("ttl_seconds")
        except (ValueError, AttributeError):
            raise HTTPError(400, "body: allowed: {\"ttl_seconds\": <seconds> or null}") from None
        CheckpointStore.set_ttl(file, checked_ttl(ttl))
        return {}

    # ---- sampling -------------------------------------------------------------------------------------

    @app.post("/api/v1/create_sampling_session")
    async def create_sampling_session(request: Request):
        tenant = tenant_of(request)
        req = await parse(request, tt.CreateSamplingSessionRequest)
        session = svc.session(tenant, req.session_id)
        sampler_id = uuid.uuid4().hex
        session.samplers.add(sampler_id)
        if req.model_path is None:
            svc.check_base_model(req.base_model)
            svc.samplers[sampler_id] = Sampler(tenant, sampler_id)
        else:
            model_id, _, _, file = checked(lambda: svc.checkpoints.parse(tenant, req.model_path))
            if not file.is_file():
                raise HTTPError(404, f"no checkpoint {req.model_path!r} for this tenant")
            # a file this server saved names its model and version; one from an earlier run is
            # always sampled from a frozen copy of the file
            saved_model, version = svc.saved.get(file, (None, None))
            svc.samplers[sampler_id] = Sampler(tenant, sampler_id, req.model_path, saved_model, version, file)
        return {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    @app.get("/api/v1/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str, request: Request):
        s = svc.sampler(tenant_of(request), sampler_id)
        return {"sampler_id": s.sampler_id, "base_model": svc.model_name, "model_path": s.model_path}

    @app.post("/api/v1/join_sampling_session")
    async def join_sampling_session(request: Request):
        tenant = tenant_of(request)
        req = await parse(request, tt.JoinSamplingSessionRequest)
        s = svc.sampler(tenant, req.sampling_session_id)
        s.clients += 1
        return {"type": "join_sampling_session", "client_counter": s.clients}

    @app.post("/api/v1/asample")
    async def asample(request: Request):
        tenant = tenant_of(request)
        req = await parse(request, tt.SampleRequest)
        unsupported = [name for name, on in (
            ("topk_prompt_logprobs", req.topk_prompt_logprobs > 0), ("topk_sample_logprobs", req.topk_sample_logprobs > 0),
            ("target_prompt_logprobs", req.target_prompt_logprobs is not None),
            ("prompt_alt_tokens_k", req.prompt_alt_tokens_k > 0),
            ("prompt_logprobs_last_n", req.prompt_logprobs_last_n is not None)) if on]
        if unsupported:
            raise HTTPError(400, f"{', '.join(unsupported)}: not supported by colo; allowed: prompt_logprobs")
        if req.sampling_session_id is not None:
            s = svc.sampler(tenant, req.sampling_session_id)
        else:  # an ad-hoc request names its weights itself
            if req.model_path is not None:
                raise HTTPError(400, "sampling by model_path needs a sampling session; create_sampling_session")
            svc.check_base_model(req.base_model)
            s = Sampler(tenant, "base")
        prompt = checked(lambda: tinker_wire.tokens_of(req.prompt, "prompt"))
        params = tinker_wire.sampling_params(req.sampling_params)
        want_prompt = bool(req.prompt_logprobs)

        def resolve(trainer: Trainer) -> SampleJob:
            return SampleJob(svc.resolve_adapter(trainer, s), prompt, req.num_samples, params, want_prompt)

        future = svc.worker.sample(s.sampler_id, resolve)
        answer = svc.submit(tenant, future, lambda result: (tinker_wire.sample_response(result), "proto"))
        ids = [f"{answer['request_id']}:{i}" for i in range(req.num_samples)]
        answer["sample_sequence_ids"] = ids
        if req.record_stability_info:
            def record(done) -> None:
                if done.exception() is None:
                    for sequence_id, seq in zip(ids, done.result().sequences):
                        svc.stability.record(tenant, sequence_id, prompt, seq.tokens, seq.logprobs)

            future.add_done_callback(record)
        return answer

    # ---- futures --------------------------------------------------------------------------------------

    @app.post("/api/v1/retrieve_future")
    async def retrieve_future(request: Request):
        tenant = tenant_of(request)
        req = await parse(request, tt.FutureRetrieveRequest)
        item = svc.futures.get(tenant, req.request_id)
        if item is None:
            raise HTTPError(404, f"unknown request_id {req.request_id!r}")
        if not await svc.futures.wait(item):
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

    @app.post("/api/v1/cancel_future")
    async def cancel_future(request: Request):
        tenant_of(request)
        await body_of(request)
        return {}

    served = sorted({f"{m} {r.path}" for r in app.routes for m in getattr(r, "methods", ()) if m != "HEAD"})

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def not_served(path: str, request: Request):
        # a clear answer for what the SDK may call and colo does not do (publishing, billing, ...);
        # 4xx, since the SDK retries a 5xx forever
        raise HTTPError(404, f"{request.method} /{path} is not served by colo; served: {', '.join(served)}")

    return app


def checked_ttl(ttl) -> int | None:
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= 10 * 365 * 86400):
        raise HTTPError(400, f"ttl_seconds={ttl!r}; allowed: None (keep) or whole seconds in [1, 315360000]")
    return ttl


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def checked(fn):
    """Run a parser of client input; its InvalidRequestError becomes a 400."""
    try:
        return fn()
    except InvalidRequestError as e:
        raise HTTPError(400, str(e)) from None
