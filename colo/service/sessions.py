"""The SDK's sessions: one per ``ServiceClient``, kept alive by its heartbeats (every 10 s).

A session groups what its client made: its models (``Models`` records each model's session) and its
sampling sessions. When the client finishes it, or goes silent for ``SESSION_TTL_SECONDS``, its models
are deleted to free their adapters. A finished session answers ``Gone`` (410), as Tinker's do.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from colo.service.errors import Gone, NotFound
from colo.service.models import Models

log = logging.getLogger(__name__)

SESSION_TTL_SECONDS = 120.0  # a session silent this long loses its models


@dataclass
class Session:
    tenant: str
    session_id: str
    last_seen: float
    samplers: set[str] = field(default_factory=set)
    finished: bool = False


class Sessions:
    def __init__(self, models: Models) -> None:
        self._models = models
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def create(self, tenant: str) -> str:
        session_id = uuid.uuid4().hex
        with self._lock:
            self._sessions[session_id] = Session(tenant, session_id, time.monotonic())
        return session_id

    def touch(self, tenant: str, session_id: str, finished_ok: bool = False) -> Session:
        """The tenant's session, marked as seen now (a heartbeat, or a request that names it)."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None or s.tenant != tenant:
                raise NotFound(f"unknown session {session_id!r}; create_session makes one")
            if s.finished and not finished_ok:
                raise Gone(f"session {session_id!r} was finished; create_session makes a new one")
            s.last_seen = time.monotonic()
            return s

    def add_sampler(self, session: Session, sampler_id: str) -> None:
        with self._lock:
            session.samplers.add(sampler_id)

    def view(self, tenant: str, session_id: str) -> tuple[list[str], list[str]]:
        """(model ids, sampling session ids) of the session."""
        session = self.touch(tenant, session_id, finished_ok=True)
        with self._lock:
            samplers = sorted(session.samplers)
        return self._models.of_session(session_id), samplers

    def ids(self, tenant: str) -> list[str]:
        with self._lock:
            return [sid for sid, s in self._sessions.items() if s.tenant == tenant]

    def finish(self, tenant: str, session_id: str) -> None:
        """The SDK's ServiceClient.close(): the session's models go; a second finish changes nothing."""
        session = self.touch(tenant, session_id, finished_ok=True)
        with self._lock:
            session.finished = True
        self._models.drop_session(session_id)

    def reap(self) -> None:
        """Forget the sessions whose client stopped beating, and delete their models."""
        now = time.monotonic()
        with self._lock:
            silent = [s for s in self._sessions.values() if now - s.last_seen > SESSION_TTL_SECONDS]
            for s in silent:
                del self._sessions[s.session_id]
        for s in silent:
            if not s.finished:
                log.info("session %s went silent; deleting its %d models", s.session_id,
                         len(self._models.of_session(s.session_id)))
            self._models.drop_session(s.session_id)
