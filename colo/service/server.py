"""The service's parts put together: the Trainer and the worker thread that owns it, the state, the
checkpoint store, the request futures and the stability records; and what the routes ask of them
that takes more than one part (ordered training requests, dropping a model, resolving what a
sampling session samples, expiring checkpoints, reaping silent sessions)."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

from colo import default_model
from colo.errors import InvalidRequestError
from colo.service.checkpoint_store import CheckpointStore
from colo.service.futures import Futures
from colo.service.stability import StabilityRecords
from colo.service.state import Model, NotFound, Sampler, Session, State
from colo.service.tenants import Tenants
from colo.service.worker import Worker
from colo.trainer import Trainer

log = logging.getLogger(__name__)

EPHEMERAL_KEPT = 4  # unnamed sampler snapshots kept per model
SESSION_TTL_SECONDS = 120.0  # a session silent this long (the SDK beats every 10 s) loses its models
SEEN_PER_MODEL = 4096  # answered seq_ids remembered per model, for POSTs the SDK sends again

Encode = Callable[[Any], tuple[bytes | dict, str]]  # a job's result -> (body, "proto" | "json")


class Service:
    def __init__(self, trainer: Trainer, tenants: Tenants, checkpoints: CheckpointStore,
                 model_name: str | None = None) -> None:
        self.trainer = trainer
        self.worker = Worker(trainer)
        self.tenants = tenants
        self.checkpoints = checkpoints
        self.state = State()
        self.futures = Futures()
        self.stability = StabilityRecords()
        configured = model_name or trainer.config.model
        self.model_name = default_model.HUB_ID if default_model.is_default(configured) else configured
        # names a client may use for the base model: the served name, the short name, the local path
        self.base_names = {self.model_name, configured, trainer.model_path}
        if default_model.is_default(configured):
            self.base_names.add(default_model.NAME)
        self.arch = trainer.policy.architecture
        self._seen: dict[str, dict[int, str]] = {}  # model_id -> seq_id -> request_id, for retried POSTs
        self._seen_lock = threading.Lock()
        self.stopping = False
        self.stopped = False

    def check_base_model(self, base_model: str | None) -> None:
        if base_model is not None and base_model not in self.base_names:
            raise InvalidRequestError(f"base_model {base_model!r} is not served here; allowed: {self.model_name!r}")

    # ---- jobs ---------------------------------------------------------------------------------------

    def submit(self, tenant: str, future: Future, encode: Encode) -> dict:
        return {"request_id": self.futures.add(tenant, future, encode)}

    def ordered(self, tenant: str, model: Model, seq_id: int | None, fn: Callable[[Trainer], Any],
                encode: Encode) -> dict:
        """Run ``fn`` in the model's ``seq_id`` order; a POST sent again gets the first one's request id."""
        if seq_id is None:
            raise InvalidRequestError("seq_id is missing; allowed: the training client's request counter + 1")
        model.last_request = time.time()
        with self._seen_lock:
            seen = self._seen.setdefault(model.model_id, {})
            if seq_id in seen:  # the SDK re-sent a POST whose answer it lost
                return {"request_id": seen[seq_id]}
            answer = self.submit(tenant, self.worker.ordered(model.model_id, seq_id, fn), encode)
            seen[seq_id] = answer["request_id"]
            if len(seen) > SEEN_PER_MODEL:  # a retry comes within seconds: forget the oldest half
                for old in sorted(seen)[: SEEN_PER_MODEL // 2]:
                    del seen[old]
        return answer

    # ---- models -------------------------------------------------------------------------------------

    def add_model(self, session: Session, model_id: str, adapter: str, rank: int) -> None:
        """Runs on the worker, in the job that made the adapter."""
        self.state.add_model(session, model_id, adapter, rank)
        self.worker.open_order(model_id, first_seq=1)

    def check_quota(self, tenant: str) -> None:
        """Runs on the worker, where models are added, so concurrent creations cannot both pass."""
        held = self.state.model_count(tenant)
        limit = self.trainer.config.max_models_per_tenant
        if held >= limit:
            raise InvalidRequestError(f"this tenant holds {held} models; allowed: at most {limit} "
                                      "(COLO_MAX_MODELS_PER_TENANT); unload_model one first")

    def drop_model(self, model_id: str) -> Future:
        """Forget the model now; its adapters (live and frozen copies) are deleted by the returned job."""
        m, frozen = self.state.pop_model(model_id)
        self.worker.close_order(model_id)
        with self._seen_lock:
            self._seen.pop(model_id, None)

        def delete(trainer: Trainer) -> str:
            for adapter in ([m.adapter] if m else []) + frozen:
                if adapter in trainer.adapters:
                    trainer.delete_lora(adapter)
            return model_id

        return self.worker.call(delete)

    def finish_session(self, session: Session) -> None:
        for model_id in self.state.finish(session):
            self.drop_model(model_id)

    def reap_sessions(self) -> None:
        """Delete the models of sessions whose client stopped beating, to free their adapters."""
        for s in self.state.take_silent(SESSION_TTL_SECONDS):
            if not s.finished:
                log.info("session %s went silent; deleting its %d models", s.session_id, len(s.models))
            self.finish_session(s)

    # ---- checkpoints --------------------------------------------------------------------------------

    def before_save(self, trainer: Trainer, model_folder: Path) -> None:
        """Runs on the worker before a save, in the saved model's folder only (a save is on the training hot
        path; the housekeeping timer covers every folder): killed saves' leftovers go, and what expired."""
        self.checkpoints.sweep(model_folder)
        self.expire_checkpoints(trainer, model_folder)

    def housekeeping(self, trainer: Trainer) -> None:
        """Runs on the worker, from the service's housekeeping timer: over every folder."""
        self.checkpoints.sweep(self.checkpoints.root)
        self.expire_checkpoints(trainer)

    def expire_checkpoints(self, trainer: Trainer, folder: Path | None = None) -> None:
        """Runs on the worker, which writes checkpoints, so a save and a deletion never meet."""
        for file in self.checkpoints.expire(folder):
            self._forget(trainer, file)
            log.info("checkpoint %s expired (ttl_seconds); deleted", file)

    def delete_checkpoint(self, trainer: Trainer, file: Path) -> None:
        self.checkpoints.delete(file)
        self._forget(trainer, file)

    def prune_ephemeral(self, trainer: Trainer, folder: Path, keep: int = EPHEMERAL_KEPT) -> None:
        """Unnamed sampler snapshots are for the next rollouts: keep a model's newest few on disk."""
        files = sorted(folder.glob("ephemeral-*.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
        for old in files[keep:]:
            old.unlink(missing_ok=True)
            self._forget(trainer, old)

    def _forget(self, trainer: Trainer, file: Path) -> None:
        adapter = self.state.forget_file(file)
        if adapter in trainer.adapters:
            trainer.delete_lora(adapter)

    # ---- sampling -----------------------------------------------------------------------------------

    def saved_sampler(self, tenant: str, sampler_id: str, tinker_path: str) -> Sampler:
        """A sampling session of the version saved at ``tinker_path``. A file this server saved names its
        model and version; one from an earlier run is always sampled from a frozen copy of the file."""
        _, _, _, file = self.checkpoints.parse(tenant, tinker_path)
        if not file.is_file():
            raise NotFound(f"no checkpoint {tinker_path!r} for this tenant")
        saved_model, version = self.state.saved_version(file)
        return Sampler(tenant, sampler_id, tinker_path, saved_model, version, file)

    def resolve_adapter(self, trainer: Trainer, s: Sampler) -> str | None:
        """Runs on the worker: the adapter that holds exactly the weights ``s`` samples."""
        if s.model_id is None and s.file is None:
            return None
        m = self.state.live_model(s.tenant, s.model_id) if s.model_id else None
        if m is not None and m.adapter in trainer.adapters and (s.version is None or
                                                                 trainer.version(m.adapter) == s.version):
            return m.adapter
        if s.file is None:
            raise InvalidRequestError(f"model {s.model_id} of this sampling session was deleted")
        adapter = self.state.frozen(s.file)
        if adapter is None or adapter not in trainer.adapters:
            if not s.file.is_file():
                raise InvalidRequestError(f"checkpoint {s.model_path} no longer exists")
            for old in self.state.unfreeze_folder(s.file.parent):  # one frozen copy per model
                if old in trainer.adapters:
                    trainer.delete_lora(old)
            adapter = trainer.load_state(s.file)
            self.state.freeze(s.file, adapter)
        return adapter
