"""What the service knows: sessions, models, sampling sessions, saved versions and their frozen copies.

One object owns it, behind one lock: the HTTP routes (the event-loop thread) and the jobs (the worker
thread) read and change it only through these methods, never through its dictionaries. A lookup by
another tenant finds nothing, exactly as if the id did not exist (``NotFound``); a finished session
answers ``Gone``. The routes turn those into 404 and 410; inside a job they fail the job as the
caller's error.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from colo.errors import ColoError


class NotFound(ColoError):
    """An id this tenant does not have."""


class Gone(ColoError):
    """A session its client finished."""


@dataclass
class Session:
    tenant: str
    session_id: str
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


class State:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._sessions: dict[str, Session] = {}
        self._models: dict[str, Model] = {}
        self._samplers: dict[str, Sampler] = {}
        self._frozen: dict[Path, str] = {}  # a saved version no longer live -> the adapter holding it
        self._saved: dict[Path, tuple[str, int]] = {}  # file -> (model_id, version) saved by this server

    # ---- sessions -------------------------------------------------------------------------------

    def add_session(self, tenant: str) -> str:
        session_id = uuid.uuid4().hex
        with self._lock:
            self._sessions[session_id] = Session(tenant, session_id, time.monotonic())
        return session_id

    def session(self, tenant: str, session_id: str, finished_ok: bool = False) -> Session:
        """The tenant's session, marked as seen now."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None or s.tenant != tenant:
                raise NotFound(f"unknown session {session_id!r}; create_session makes one")
            if s.finished and not finished_ok:
                raise Gone(f"session {session_id!r} was finished; create_session makes a new one")
            s.last_seen = time.monotonic()
            return s

    def session_ids(self, tenant: str) -> list[str]:
        with self._lock:
            return [sid for sid, s in self._sessions.items() if s.tenant == tenant]

    def session_view(self, tenant: str, session_id: str) -> tuple[list[str], list[str]]:
        """(model ids, sampler ids) of the session."""
        with self._lock:
            s = self.session(tenant, session_id, finished_ok=True)
            return sorted(s.models), sorted(s.samplers)

    def finish(self, session: Session) -> list[str]:
        """Mark the session finished; the ids of its models, for the caller to drop."""
        with self._lock:
            session.finished = True
            models, session.models = sorted(session.models), set()
            return models

    def take_silent(self, older_than: float) -> list[Session]:
        """Remove and return the sessions not seen for ``older_than`` seconds."""
        now = time.monotonic()
        with self._lock:
            silent = [s for s in self._sessions.values() if now - s.last_seen > older_than]
            for s in silent:
                del self._sessions[s.session_id]
            return silent

    # ---- models ---------------------------------------------------------------------------------

    def has_model(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._models

    def add_model(self, session: Session, model_id: str, adapter: str, rank: int) -> Model:
        with self._lock:
            m = self._models[model_id] = Model(session.tenant, model_id, adapter, rank)
            session.models.add(model_id)
            return m

    def model(self, tenant: str, model_id: str) -> Model:
        with self._lock:
            m = self._models.get(model_id)
            if m is None or m.tenant != tenant:
                raise NotFound(f"unknown model {model_id!r}; create_model makes one")
            return m

    def live_model(self, tenant: str, model_id: str) -> Model | None:
        with self._lock:
            m = self._models.get(model_id)
            return m if m is not None and m.tenant == tenant else None

    def model_count(self, tenant: str) -> int:
        with self._lock:
            return sum(1 for m in self._models.values() if m.tenant == tenant)

    def model_ids(self, tenant: str) -> list[str]:
        with self._lock:
            return [m.model_id for m in self._models.values() if m.tenant == tenant]

    def pop_model(self, model_id: str) -> tuple[Model | None, list[str]]:
        """Forget the model: (the model, the adapters of its frozen copies), both for the caller to delete."""
        with self._lock:
            m = self._models.pop(model_id, None)
            for s in self._sessions.values():
                s.models.discard(model_id)
            frozen = [f for f in self._frozen if f.parent.parent.name == model_id]
            return m, [self._frozen.pop(f) for f in frozen]

    # ---- sampling sessions ----------------------------------------------------------------------

    def add_sampler(self, sampler: Sampler, session: Session | None = None) -> None:
        with self._lock:
            self._samplers[sampler.sampler_id] = sampler
            if session is not None:
                session.samplers.add(sampler.sampler_id)

    def sampler(self, tenant: str, sampler_id: str) -> Sampler:
        with self._lock:
            s = self._samplers.get(sampler_id)
            if s is None or s.tenant != tenant:
                raise NotFound(f"unknown sampling session {sampler_id!r}; create_sampling_session makes one")
            return s

    def join(self, sampler: Sampler) -> int:
        with self._lock:
            sampler.clients += 1
            return sampler.clients

    # ---- saved versions and their frozen copies -------------------------------------------------

    def saved_as(self, file: Path, model_id: str, version: int) -> None:
        with self._lock:
            self._saved[file] = (model_id, version)

    def saved_version(self, file: Path) -> tuple[str | None, int | None]:
        with self._lock:
            return self._saved.get(file, (None, None))

    def forget_file(self, file: Path) -> str | None:
        """The file is gone: forget its version; the adapter of its frozen copy, if any, for the caller."""
        with self._lock:
            self._saved.pop(file, None)
            return self._frozen.pop(file, None)

    def frozen(self, file: Path) -> str | None:
        with self._lock:
            return self._frozen.get(file)

    def unfreeze_folder(self, folder: Path) -> list[str]:
        """Forget the frozen copies of the versions saved in ``folder`` (one model's); their adapters, for the
        caller to delete before it loads another (one frozen copy per model)."""
        with self._lock:
            return [self._frozen.pop(f) for f in [f for f in self._frozen if f.parent == folder]]

    def freeze(self, file: Path, adapter: str) -> None:
        """``adapter`` holds the version saved in ``file``."""
        with self._lock:
            self._frozen[file] = adapter
