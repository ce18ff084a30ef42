"""The one thread that owns the Trainer: every request that touches the model or the engine is a job here.

- Jobs (``call``) run in the order they came: control jobs (model creation, deletion, checkpoint
  housekeeping) and training jobs, which ``models.Models`` hands over one per model at a time, in
  ``seq_id`` order.
- Sample jobs that arrive together, from any clients and adapters, go to the engine in one call.
- Each round runs the jobs queued when it began, then one sample batch, so neither samplers nor any
  one model can starve the others.
A job's result or error lands in its ``concurrent.futures.Future``; the HTTP layer waits on that.
``status()`` says what runs, what waits and when a job last finished: the health check reads it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from colo.errors import ColoError, EngineError
from colo.service.errors import ShuttingDown
from colo.trainer import Trainer
from colo.types import SampleJob, SampleResult

log = logging.getLogger(__name__)

KINDS = ("control", "train")  # what a job is, for the health check's view


@dataclass
class _Job:
    kind: str
    run: Callable[[Trainer], Any]
    future: Future


@dataclass
class _SampleItem:
    key: str  # who asked (a sampling session): batches are filled round-robin over keys
    resolve: Callable[[Trainer], SampleJob]  # runs on the worker: picks the adapter version to sample
    future: Future


@dataclass
class WorkerStatus:
    running: str | None  # "control", "train" or "sample"
    running_seconds: float
    queued: dict[str, int]
    seconds_since_progress: float  # since a job last finished, or the queue was last empty

    def stalled(self, limit: float) -> bool:
        return (self.running is not None or any(self.queued.values())) and self.seconds_since_progress > limit


def _fail(future: Future, e: BaseException, what: str) -> None:
    """A job's error goes to its caller; only an unexpected one (not colo's own) is logged here."""
    if not isinstance(e, ColoError):
        log.error("%s failed", what, exc_info=e)
    future.set_exception(e)


class Worker:
    def __init__(self, trainer: Trainer, max_batch_sequences: int = 512) -> None:
        self.trainer = trainer
        self.max_batch_sequences = max_batch_sequences
        self._cv = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self._samples: deque[_SampleItem] = deque()
        self._stopping = False
        self._running: tuple[str, float] | None = None
        self._progress = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="colo-worker", daemon=True)
        self._thread.start()

    # ---- submitting (any thread) ----------------------------------------------------------------

    def call(self, fn: Callable[[Trainer], Any], kind: str = "control") -> Future:
        """Run ``fn(trainer)`` soon, after the jobs already queued."""
        assert kind in KINDS, kind
        future: Future = Future()
        with self._cv:
            self._refuse_if_stopping()
            self._jobs.append(_Job(kind, fn, future))
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
            queued = {kind: sum(1 for j in self._jobs if j.kind == kind) for kind in KINDS}
            queued["sample"] = len(self._samples)
            progress = self._progress
        return WorkerStatus(running[0] if running else None, now - running[1] if running else 0.0, queued,
                            now - progress)

    def stop(self, timeout: float = 600.0) -> bool:
        """Refuse new jobs, answer queued ones with ``ShuttingDown``, let the running one finish; False if it
        is still running after ``timeout`` seconds (it is then abandoned: the thread is a daemon)."""
        with self._cv:
            self._stopping = True
            dropped = [j.future for j in self._jobs] + [s.future for s in self._samples]
            self._jobs.clear()
            self._samples.clear()
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
                while not self._stopping and not (self._jobs or self._samples):
                    self._progress = time.monotonic()  # idle is not stalled
                    self._cv.wait(timeout=1.0)  # so the mark stays fresh however long the idle
                if self._stopping:
                    return
                jobs = list(self._jobs)
                self._jobs.clear()
                batch = self._take_sample_batch()
            for job in jobs:
                self._timed(job.kind, self._run, job)
            if batch:
                self._timed("sample", self._run_samples, batch)

    def _timed(self, kind: str, run: Callable, *args) -> None:
        with self._cv:
            self._running = (kind, time.monotonic())
        try:
            run(*args)
        finally:
            with self._cv:
                self._running = None
                self._progress = time.monotonic()

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

    def _run(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.run(self.trainer))
        except BaseException as e:  # the worker must outlive any one job
            _fail(job.future, e, f"a {job.kind} job")

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
                _fail(item.future, e, "a sample request")
                continue
            jobs.append(job)
            items.append(item)
        if not jobs:
            return
        try:
            results: list[SampleResult] = self.trainer.sample_batch(jobs)
        except BaseException as e:
            if len(jobs) == 1:
                _fail(items[0].future, e, "a sample request")
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
            _fail(item.future, e, "a sample request")
            return e
