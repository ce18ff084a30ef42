"""Request futures of the Tinker API: a POST answers ``{request_id}`` at once and the client polls
``/api/v1/retrieve_future`` for the result.

A poll waits up to ``POLL_SECONDS`` for the job (long polling; the SDK gives up on a poll after 45 s),
then answers ``try_again``. A result
is kept until ``KEEP_SECONDS`` after it was first fetched (the SDK may fetch twice after a lost
reply), and unfetched results until ``UNCLAIMED_SECONDS``, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from colo.service.errors import NotFound

POLL_SECONDS = 30.0
KEEP_SECONDS = 120.0
UNCLAIMED_SECONDS = 3600.0

Encode = Callable[[Any], tuple[bytes | dict, str]]  # a job's result -> (body, "proto" | "json")


@dataclass
class Pending:
    tenant: str
    future: Future
    encode: Encode
    created: float
    fetched: float | None = None


class Futures:
    def __init__(self) -> None:
        self._items: dict[str, Pending] = {}
        self._lock = threading.Lock()

    def add(self, tenant: str, future: Future, encode: Encode) -> str:
        request_id = uuid.uuid4().hex
        with self._lock:
            self._expire()
            self._items[request_id] = Pending(tenant, future, encode, time.monotonic())
        return request_id

    def submit(self, tenant: str, future: Future, encode: Encode) -> dict:
        """The answer to a POST that started a job: ``{request_id}``, for the client to poll."""
        return {"request_id": self.add(tenant, future, encode)}

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

    def _expire(self) -> None:
        now = time.monotonic()
        gone = [rid for rid, p in self._items.items()
                if (p.fetched is not None and now - p.fetched > KEEP_SECONDS)
                or (p.fetched is None and p.future.done() and now - p.created > UNCLAIMED_SECONDS)]
        for rid in gone:
            del self._items[rid]
