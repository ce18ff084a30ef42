"""The SDK's sessions: one per ``ServiceClient``, kept alive by its heartbeats (every 10 s).

A session groups what its client made: its models (``Models`` records each model's session) and its
sampling sessions. When the client finishes it, or goes silent for ``SESSION_TTL_SECONDS``, its models
are deleted to free their adapters. A finished session answers ``Gone`` (410), as Tinker's do, and is
still listed (with how it finished) until it is forgotten ``SESSION_TTL_SECONDS`` later.

What the client said when it made the session (display name, user metadata, project) is kept for
``search``. A project is a label here: colo has no organizations or permissions to attach to one.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from tinker import types as tt

from colo.errors import InvalidRequestError
from colo.service.checkpoint_store import CheckpointStore
from colo.service.errors import Gone, NotFound
from colo.service.models import Models

log = logging.getLogger(__name__)

SESSION_TTL_SECONDS = 120.0  # a session silent this long loses its models
DEFAULT_PROJECT = "default"  # the project of a session created without one
FINISH_REASONS = {"success": tt.ClientSessionFinishSuccess, "errored": tt.ClientSessionFinishErrored,
                  "interrupted": tt.ClientSessionFinishInterrupted}


@dataclass
class Session:
    tenant: str
    session_id: str
    last_seen: float
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    display_name: str | None = None
    user_metadata: dict[str, str] = field(default_factory=dict)
    project_id: str = DEFAULT_PROJECT
    samplers: set[str] = field(default_factory=set)
    finished: tt.ClientSessionFinished | None = None  # how its client finished it


class Sessions:
    def __init__(self, models: Models) -> None:
        self._models = models
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def create(self, tenant: str, req: tt.CreateSessionRequest | None = None) -> str:
        session_id = uuid.uuid4().hex
        s = Session(tenant, session_id, time.monotonic())
        if req is not None:
            s.display_name = req.display_name
            # the SDK sends strings; other JSON values are kept as their text, as search compares text
            s.user_metadata = {str(k): v if isinstance(v, str) else str(v) for k, v in (req.user_metadata or {}).items()}
            s.project_id = req.project_id or DEFAULT_PROJECT
        with self._lock:
            self._sessions[session_id] = s
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

    def view(self, tenant: str, session_id: str) -> tt.GetSessionResponse:
        """The SDK's ``get_session``: the session's models and sampling sessions, its name and metadata."""
        session = self.touch(tenant, session_id, finished_ok=True)
        with self._lock:
            samplers = sorted(session.samplers)
        return tt.GetSessionResponse(training_run_ids=self._models.of_session(session_id), sampler_ids=samplers,
                                     user_metadata=session.user_metadata or None, display_name=session.display_name)

    def ids(self, tenant: str, limit: int | None = None, offset: int = 0) -> list[str]:
        """The tenant's session ids, newest first."""
        with self._lock:
            mine = sorted((s for s in self._sessions.values() if s.tenant == tenant),
                          key=lambda s: (s.created_at, s.session_id), reverse=True)
        mine = mine[offset:] if limit is None else mine[offset:offset + limit]
        return [s.session_id for s in mine]

    def set_project(self, tenant: str, session_id: str, project_id: Any) -> None:
        """The SDK's ``assign_session_project``: the session's project label (search filters on it)."""
        if not isinstance(project_id, str) or not project_id:
            raise InvalidRequestError(f"project_id {project_id!r}; allowed: a non-empty string (clearing a "
                                      "session's project is not supported, as in Tinker)")
        session = self.touch(tenant, session_id, finished_ok=True)
        with self._lock:
            session.project_id = project_id

    def search(self, tenant: str, req: tt.SessionSearchRequest, store: CheckpointStore) -> tt.SessionSearchResponse:
        """The SDK's ``search_sessions``: the tenant's sessions matching ``req``, newest first, one page.
        Another tenant's sessions are never seen: owner ``accessible`` is the tenant's own, ``user``
        matches only the tenant's own name."""
        owner = req.owner.type
        if owner == "user" and tenant not in req.owner.owner_urns:
            return tt.SessionSearchResponse(sessions=[])
        with self._lock:
            found = [s for s in self._sessions.values() if s.tenant == tenant and self._matches(s, req)]
        found.sort(key=lambda s: (s.created_at, s.session_id), reverse=True)
        if req.cursor is not None:
            after = (req.cursor.last_created_at, req.cursor.last_session_id)
            found = [s for s in found if (s.created_at, s.session_id) < after]
        page, more = found[:req.limit], len(found) > req.limit
        on_disk = store.models_on_disk(tenant)
        sessions = []
        for s in page:
            stored = [c for m in on_disk if m.startswith(f"{s.session_id}:") for c in store.list(tenant, m)]
            sessions.append(tt.SessionSummary(
                session_id=s.session_id, created_at=s.created_at, owner=tenant, project_id=s.project_id,
                status=s.finished or tt.SessionActive(), checkpoints_count=len(stored),
                display_name=s.display_name, user_metadata=dict(s.user_metadata),
                checkpoint_storage_bytes=sum(c.size_bytes for c in stored)))
        last = page[-1] if more else None
        cursor = tt.SessionSearchCursor(last_created_at=last.created_at, last_session_id=last.session_id) if last else None
        return tt.SessionSearchResponse(sessions=sessions, next_cursor=cursor)

    @staticmethod
    def _matches(s: Session, req: tt.SessionSearchRequest) -> bool:
        if req.session_id is not None or req.display_name is not None:
            by_id = req.session_id is not None and s.session_id == req.session_id
            name = (s.display_name or "").lower()
            by_name = req.display_name is not None and all(w in name for w in req.display_name.lower().split())
            if not (by_id or by_name):
                return False
        if req.project_ids is not None and s.project_id not in req.project_ids:
            return False
        if any(s.user_metadata.get(k) != v for k, v in req.user_metadata.items()):
            return False
        if req.statuses is not None:
            status = "client_finished" if s.finished else "active"  # colo fails or cancels no session
            if not any(q.type == status and (q.type != "client_finished" or q.reasons is None
                                             or s.finished.reason.type in q.reasons) for q in req.statuses):
                return False
        return True

    def finish(self, tenant: str, session_id: str, reason: str = "success", detail: str | None = None) -> None:
        """The SDK's ServiceClient.close(): the session's models go; the first finish's reason is kept,
        a second finish changes nothing."""
        if reason not in FINISH_REASONS:
            raise InvalidRequestError(f"finish reason {reason!r}; allowed: {', '.join(FINISH_REASONS)}")
        session = self.touch(tenant, session_id, finished_ok=True)
        with self._lock:
            if session.finished is None:
                session.finished = tt.ClientSessionFinished(reason=FINISH_REASONS[reason](), detail=detail)
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
