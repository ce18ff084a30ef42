"""Request futures of the Tinker API: a POST answers ``{request_id}`` at once and the client polls
``/api/v1/retrieve_future`` for the result.

A poll waits up to ``POLL_SECONDS`` for the job (long polling; the SDK gives up on a poll after 45 s),
then answers ``try_again``. A result
is kept until ``KEEP_SECONDS`` after it was first fetched (the SDK may fetch twice after a lost
reply), and unfetched results until ``UNCLAIMED_SECONDS``, so memory stays bounded.

Sample requests also join their sampling session's completion queue (one per session and cloned
client, ``seq_id // 1e9``), which ``/api/v1/retrieve_futures`` long-polls for many requests at once
(the SDK's ``sample_use_retrieve_futures``): it answers which requests finished or failed, each with a
cursor; the client passes the last cursor back and what it covers is dropped. The results themselves are
still fetched, and kept, one at a time through ``retrieve``. Cursors come from one counter for all
queues, so a queue made again after it expired never hands out a cursor its client has already seen.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from colo.service.errors import NotFound

POLL_SECONDS = 30.0
KEEP_SECONDS = 120.0
UNCLAIMED_SECONDS = 3600.0

Encode = Callable[[Any], tuple[bytes | dict, str]]  # a job's result -> (body, "proto" | "json")
QueueKey = tuple[str, int]  # (sampling session id, cloned client: seq_id // 1_000_000_000)


@dataclass
class Pending:
    tenant: str
    future: Future
    encode: Encode
    created: float
    fetched: float | None = None


@dataclass
class Completion:
    cursor: int
    request_id: str
    failed: bool


@dataclass
class _Queue:
    """One sampling client's completions not yet acknowledged, and the polls waiting for the next."""

    tenant: str
    used: float
    done: list[Completion] = field(default_factory=list)
    waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = field(default_factory=list)


def queue_of(sampling_session_id: str, seq_id: int | None) -> QueueKey:
    """The completion queue of a sample request: its session and the cloned client its ``seq_id`` names."""
    return sampling_session_id, (seq_id or 0) // 1_000_000_000


class Futures:
    def __init__(self) -> None:
        self._items: dict[str, Pending] = {}
        self._queues: dict[QueueKey, _Queue] = {}
        self._cursors = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, tenant: str, future: Future, encode: Encode, queue: QueueKey | None = None) -> str:
        request_id = uuid.uuid4().hex
        with self._lock:
            self._expire()
            self._items[request_id] = Pending(tenant, future, encode, time.monotonic())
            if queue is not None:
                self._queue(tenant, queue)
        if queue is not None:  # outside the lock: a job already done runs the callback here and now
            future.add_done_callback(lambda f: self._completed(tenant, queue, request_id, f))
        return request_id

    def submit(self, tenant: str, future: Future, encode: Encode, queue: QueueKey | None = None) -> dict:
        """The answer to a POST that started a job: ``{request_id}``, for the client to poll; with ``queue``,
        its completion is also reported on that sampling client's queue (``retrieve_many``)."""
        return {"request_id": self.add(tenant, future, encode, queue)}

    async def retrieve(self, tenant: str, request_id: str, timeout: float = POLL_SECONDS) -> Pending | None:
        """The tenant's request once its job is done; None if it is still running after ``timeout``.
        Another tenant's id reads as unknown (``NotFound``)."""
        with self._lock:
            item = self._items.get(request_id)
        if item is None or item.tenant != tenant:
            raise NotFound(f"unknown request_id {request_id!r}")
        if not item.future.done():
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(item.future)), timeout)
            except asyncio.TimeoutError:
                return None
            except BaseException:  # the job's own error: it is done, the caller reads it
                pass
        if item.fetched is None:
            item.fetched = time.monotonic()
        return item

    async def retrieve_many(self, tenant: str, queue: QueueKey, prev_cursor: int,
                            timeout: float = POLL_SECONDS) -> tuple[list[Completion], int]:
        """The completions on the tenant's ``queue`` after ``prev_cursor`` (those up to it are dropped: the
        client has them), waiting up to ``timeout`` for one; and the cursor to pass next time. The caller
        checks that the sampling session is the tenant's; a queue of another tenant reads as unknown."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with self._lock:
                q = self._queue(tenant, queue)
                q.done = [c for c in q.done if c.cursor > prev_cursor]
                if q.done or loop.time() >= deadline:
                    return list(q.done), max([prev_cursor] + [c.cursor for c in q.done])
                woken = loop.create_future()
                q.waiting.append((loop, woken))
            try:
                await asyncio.wait_for(woken, deadline - loop.time())
            except asyncio.TimeoutError:
                pass
            finally:
                with self._lock:
                    q.waiting = [w for w in q.waiting if w[1] is not woken]

    def _queue(self, tenant: str, key: QueueKey) -> _Queue:
        """(Under the lock.) The queue, made on first use."""
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _Queue(tenant, time.monotonic())
        elif q.tenant != tenant:  # ids are random: this is someone guessing
            raise NotFound(f"unknown sampling session {key[0]!r}")
        q.used = time.monotonic()
        return q

    def _completed(self, tenant: str, key: QueueKey, request_id: str, future: Future) -> None:
        """(A job's done callback, on any thread.) Report the request on its queue and wake its polls."""
        failed = future.cancelled() or future.exception() is not None
        with self._lock:
            q = self._queue(tenant, key)  # made again if it expired while the job ran
            q.done.append(Completion(next(self._cursors), request_id, failed))
            waiting, q.waiting = q.waiting, []
        for loop, woken in waiting:
            try:
                loop.call_soon_threadsafe(lambda w=woken: w.done() or w.set_result(None))
            except RuntimeError:  # that poll's loop is closed: nobody waits there any more
                pass

    def _expire(self) -> None:
        now = time.monotonic()
        gone = [rid for rid, p in self._items.items()
                if (p.fetched is not None and now - p.fetched > KEEP_SECONDS)
                or (p.fetched is None and p.future.done() and now - p.created > UNCLAIMED_SECONDS)]
        for rid in gone:
            del self._items[rid]
        # a queue nobody polled or added to for an hour: its client is gone (an unpickled clone, say)
        for key in [k for k, q in self._queues.items() if now - q.used > UNCLAIMED_SECONDS and not q.waiting]:
            del self._queues[key]
