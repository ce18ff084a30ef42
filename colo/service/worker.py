"""The one thread that owns the Trainer: every request that touches the model or the engine is a job here.

- Training jobs of one model run in ``seq_id`` order (the SDK may send them out of order; a job
  waits for its predecessors, and a gap that stays open for ``GAP_SECONDS`` is skipped with a warning).
- Sample jobs that arrive together, from any clients and adapters, go to the engine in one call.
- Each round takes one sample batch, then at most one ready training job of each model, so neither
  samplers nor any one model can starve the others.
A job's result or error lands in its ``concurrent.futures.Future``; the HTTP layer waits on that.
``status()`` says what runs, what waits and when a job last finished: the health check reads it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from colo.errors import ColoError, EngineError
from colo.trainer import Trainer
from colo.types import SampleJob, SampleResult

log = logging.getLogger(__name__)

GAP_SECONDS = 30.0
MAX_SEQ_AHEAD = 1024  # a seq_id further ahead than this could only stall its model: refused


@dataclass
class _SampleItem:
    key: str  # who asked (a sampling session): batches are filled round-robin over keys
    resolve: Callable[[Trainer], SampleJob]  # runs on the worker: picks the adapter version to sample
    future: Future


@dataclass
class _Ordered:
    next_seq: int = 1
    pending: dict[int, tuple[Callable[[Trainer], Any], Future]] = field(default_factory=dict)
    waiting_since: float | None = None


class ShuttingDown(EngineError):
    """The service is stopping; the job was not run."""


@dataclass
class WorkerStatus:
    running: str | None  # "control", "train" or "sample"
    running_seconds: float
    queued: dict[str, int]
    seconds_since_progress: float  # since a job last finished, or the queue was last empty

    def stalled(self, limit: float) -> bool:
        return (self.running is not None or any(self.queued.values())) and self.seconds_since_progress > limit


class Worker:
    def __init__(self, trainer: Trainer, max_batch_sequences: int = 512) -> None:
        self.trainer = trainer
        self.max_batch_sequences = max_batch_sequences
        self._cv = threading.Condition()
        self._control: deque[tuple[Callable[[Trainer], Any], Future]] = deque()
        self._ordered: dict[str, _Ordered] = {}
        self._samples: deque[_SampleItem] = deque()
        self._rr = itertools.count()
        self._stopping = False
        self._running: tuple[str, float] | None = None
        self._progress = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="colo-worker", daemon=True)
        self._thread.start()

    # ---- submitting (any thread) ----------------------------------------------------------------

    def call(self, fn: Callable[[Trainer], Any]) -> Future:
        """Run ``fn(trainer)`` soon, outside any model's order (model creation, lookups)."""
        future: Future = Future()
        with self._cv:
            self._refuse_if_stopping()
            self._control.append((fn, future))
            self._cv.notify()
        return future

    def open_order(self, key: str, first_seq: int = 1) -> None:
        with self._cv:
            self._ordered.setdefault(key, _Ordered(next_seq=first_seq))

    def close_order(self, key: str) -> None:
        with self._cv:
            order = self._ordered.pop(key, None)
        for _, future in (order.pending.values() if order else ()):
            future.set_exception(ColoError(f"model {key} was deleted before this request ran"))

    def ordered(self, key: str, seq_id: int, fn: Callable[[Trainer], Any]) -> Future:
        """Run ``fn(trainer)`` after every job of ``key`` with a smaller ``seq_id``."""
        future: Future = Future()
        with self._cv:
            self._refuse_if_stopping()
            order = self._ordered.get(key)
            if order is None:
                raise ColoError(f"model {key} was deleted; allowed: a live model's requests")
            if seq_id < order.next_seq or seq_id in order.pending:
                raise ColoError(f"seq_id {seq_id} of model {key} was already used; allowed: each seq_id once, "
                                f"the next is {order.next_seq}")
            if seq_id > order.next_seq + MAX_SEQ_AHEAD:
                raise ColoError(f"seq_id {seq_id} of model {key} is far ahead of the next one ({order.next_seq}); "
                                f"allowed: at most {MAX_SEQ_AHEAD} ahead")
            order.pending[seq_id] = (fn, future)
            self._cv.notify()
        return future

    def sample(self, key: str, resolve: Callable[[Trainer], SampleJob]) -> Future:
        future: Future = Future()
        with self._cv:
            self._refuse_if_stopping()
            self._samples.append(_SampleItem(key, resolve, future))
            self._cv.notify()
        return future

    def status(self) -> WorkerStatus:
        now = time.monotonic()
        with self._cv:
            running = self._running
            queued = {"control": len(self._control), "sample": len(self._samples),
                      "train": sum(len(o.pending) for o in self._ordered.values())}
            progress = self._progress
        return WorkerStatus(running[0] if running else None, now - running[1] if running else 0.0, queued,
                            now - progress)

    def stop(self, timeout: float = 600.0) -> bool:
        """Refuse new jobs, answer queued ones with ``ShuttingDown``, let the running one finish; False if it
        is still running after ``timeout`` seconds (it is then abandoned: the thread is a daemon)."""
        with self._cv:
            self._stopping = True
            dropped = [f for _, f in self._control] + [s.future for s in self._samples]
            dropped += [f for o in self._ordered.values() for _, f in o.pending.values()]
            self._control.clear()
            self._samples.clear()
            for o in self._ordered.values():
                o.pending.clear()
            self._cv.notify()
        for f in dropped:
            f.set_exception(ShuttingDown("the server is shutting down; this request was not run"))
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _refuse_if_stopping(self) -> None:
        if self._stopping:
            raise ShuttingDown("the server is shutting down; no new requests are taken")

    # ---- the loop (the worker thread) -----------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._skip_stale_gaps()
                while not self._stopping and not self._has_work():
                    self._progress = time.monotonic()  # idle is not stalled
                    self._cv.wait(timeout=1.0)
                    self._skip_stale_gaps()
                if self._stopping:
                    return
                control = list(self._control)
                self._control.clear()
                batch = self._take_sample_batch()
                training = self._take_ready()
            for fn, future in control:
                self._timed("control", self._run, fn, future)
            if batch:
                self._timed("sample", self._run_samples, batch)
            for fn, future in training:
                self._timed("train", self._run, fn, future)

    def _timed(self, kind: str, run: Callable, *args) -> None:
        with self._cv:
            self._running = (kind, time.monotonic())
        try:
            run(*args)
        finally:
            with self._cv:
                self._running = None
                self._progress = time.monotonic()

    def _has_work(self) -> bool:
        if self._control or self._samples:
            return True
        return any(o.next_seq in o.pending for o in self._ordered.values())

    def _take_ready(self) -> list[tuple[Callable[[Trainer], Any], Future]]:
        ready = []
        keys = list(self._ordered)
        start = next(self._rr) % len(keys) if keys else 0
        for key in keys[start:] + keys[:start]:
            order = self._ordered[key]
            job = order.pending.pop(order.next_seq, None)
            if job is not None:
                order.next_seq += 1
                order.waiting_since = None
                ready.append(job)
        return ready

    def _skip_stale_gaps(self) -> None:
        now = time.monotonic()
        for key, order in self._ordered.items():
            if not order.pending or order.next_seq in order.pending:
                continue
            if order.waiting_since is None:
                order.waiting_since = now
            elif now - order.waiting_since > GAP_SECONDS:
                lowest = min(order.pending)
                log.warning("model %s: seq_id %d never came in %.0f s; going on with %d", key, order.next_seq,
                            GAP_SECONDS, lowest)
                order.next_seq = lowest
                order.waiting_since = None

    def _take_sample_batch(self) -> list[_SampleItem]:
        """Round-robin over the waiting sessions so one client's flood cannot crowd out another."""
        by_key: dict[str, deque[_SampleItem]] = {}
        for item in self._samples:
            by_key.setdefault(item.key, deque()).append(item)
        batch: list[_SampleItem] = []
        while by_key and len(batch) < self.max_batch_sequences:
            for key in list(by_key):
                batch.append(by_key[key].popleft())
                if not by_key[key]:
                    del by_key[key]
                if len(batch) >= self.max_batch_sequences:
                    break
        taken = {id(i) for i in batch}
        self._samples = deque(i for i in self._samples if id(i) not in taken)
        return batch

    def _run(self, fn: Callable[[Trainer], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(self.trainer))
        except BaseException as e:  # the worker must outlive any one job
            if not isinstance(e, ColoError):
                log.exception("job failed")
            future.set_exception(e)

    def _run_samples(self, batch: list[_SampleItem]) -> None:
        """One engine call for the whole batch; a job that fails its own checks fails alone."""
        jobs: list[SampleJob] = []
        items: list[_SampleItem] = []
        for item in batch:
            if not item.future.set_running_or_notify_cancel():
                continue
            try:
                job = item.resolve(self.trainer)
                self.trainer.check_sample_job(job)
            except BaseException as e:
                if not isinstance(e, ColoError):
                    log.exception("sample request failed")
                item.future.set_exception(e)
                continue
            jobs.append(job)
            items.append(item)
        if not jobs:
            return
        try:
            results: list[SampleResult] = self.trainer.sample_batch(jobs)
        except BaseException as e:
            if not isinstance(e, ColoError):
                log.exception("sample batch failed")
            if len(jobs) == 1:
                items[0].future.set_exception(e)
                return
            # whatever failed the batch must fail only the request that caused it: each runs again alone
            log.warning("a sample batch of %d requests failed (%s); running each alone", len(jobs), e)
            failures: list[BaseException] = []  # engine failures of consecutive requests run alone
            for job, item in zip(jobs, items):
                if len(failures) >= 2:
                    # two requests in a row failing alone in the engine: the engine is at fault (a dead
                    # server, say), and asking it once per remaining request would only hold the worker
                    item.future.set_exception(failures[-1])
                    continue
                error = self._run_samples_alone(job, item)
                failures = failures + [error] if isinstance(error, EngineError) else []
            return
        for item, result in zip(items, results):
            item.future.set_result(result)

    def _run_samples_alone(self, job: SampleJob, item: _SampleItem) -> BaseException | None:
        try:
            item.future.set_result(self.trainer.sample_batch([job])[0])
            return None
        except BaseException as e:
            if not isinstance(e, ColoError):
                log.exception("sample request failed")
            item.future.set_exception(e)
            return e
