"""The training models the service holds: for each, its owner, its adapter, and its requests' order.

One object owns all of it, behind one lock: which tenant and session a model belongs to, the Trainer
adapter that is its live weights (the Trainer alone knows which adapters exist and what they hold;
this is the only map from a model to one), and its training requests:

- they run in ``seq_id`` order, one at a time (the SDK may send them out of order). The next one goes
  to the worker when the one before it has finished, so a model has at most one job in the worker's
  queue and cannot crowd out the others; a gap that stays open for ``GAP_SECONDS`` is skipped with a
  warning.
- a POST sent again with a ``seq_id`` already taken (the SDK retries one whose answer it lost) gets
  the first one's request id, and runs once.

Another tenant's model reads as unknown (``NotFound``). Deleting a model forgets it here at once; its
adapter, and the frozen copies of its saved versions, are deleted by a worker job.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from colo.errors import ColoError, InvalidRequestError
from colo.service.checkpoints import Checkpoints
from colo.service.errors import NotFound, ShuttingDown
from colo.service.futures import Encode, Futures
from colo.service.worker import Worker
from colo.trainer import Trainer

log = logging.getLogger(__name__)

GAP_SECONDS = 30.0
MAX_SEQ_AHEAD = 1024  # a seq_id further ahead than this could only stall its model: refused
SEEN_PER_MODEL = 4096  # answered seq_ids remembered per model, for POSTs the SDK sends again


@dataclass(frozen=True)
class Model:
    tenant: str
    model_id: str
    session_id: str
    adapter: str
    rank: int


Job = Callable[[Trainer, Model], Any]


@dataclass
class _Record:
    model: Model
    last_request: float = field(default_factory=time.time)
    next_seq: int = 1  # the seq_id the next job to run must have
    parked: dict[int, tuple[Job, Future]] = field(default_factory=dict)  # waiting for their turn
    busy: bool = False  # one of its jobs is queued or running on the worker
    gap: threading.Timer | None = None  # counting while next_seq is missing and later ones wait
    seen: dict[int, str] = field(default_factory=dict)  # seq_id -> request_id, for POSTs sent again


class Models:
    def __init__(self, worker: Worker, futures: Futures, checkpoints: Checkpoints, max_per_tenant: int) -> None:
        self._worker = worker
        self._futures = futures
        self._checkpoints = checkpoints
        self._max_per_tenant = max_per_tenant
        # reentrant: a job handed to the worker may finish (and release the next) before the handing returns
        self._lock = threading.RLock()
        self._records: dict[str, _Record] = {}
        self._closed = False

    # ---- lookups ------------------------------------------------------------------------------------

    def get(self, tenant: str, model_id: str) -> Model:
        return self._record(tenant, model_id).model

    def live(self, tenant: str, model_id: str) -> tuple[Model, float] | None:
        """The tenant's live model and when its last training request came (Unix seconds), or None."""
        with self._lock:
            r = self._records.get(model_id)
            return (r.model, r.last_request) if r is not None and r.model.tenant == tenant else None

    def find(self, tenant: str, model_id: str) -> Model | None:
        live = self.live(tenant, model_id)
        return live[0] if live else None

    def ids(self, tenant: str) -> list[str]:
        with self._lock:
            return [i for i, r in self._records.items() if r.model.tenant == tenant]

    def of_session(self, session_id: str) -> list[str]:
        with self._lock:
            return sorted(i for i, r in self._records.items() if r.model.session_id == session_id)

    def new_id(self, session_id: str, model_seq_id: int) -> str:
        model_id = f"{session_id}:train:{model_seq_id}"
        with self._lock:
            if model_id in self._records:
                raise InvalidRequestError(f"model_seq_id {model_seq_id} was already used in this session")
        return model_id

    # ---- models made and deleted ------------------------------------------------------------------

    def create(self, tenant: str, session_id: str, model_id: str, make: Callable[[Trainer], str]) -> Future:
        """A worker job: ``make`` makes the model's adapter (a new one, or one loaded from a checkpoint).
        The quota is checked on the worker, where models are added, so concurrent creations cannot both pass."""
        def run(trainer: Trainer) -> str:
            with self._lock:
                held = sum(1 for r in self._records.values() if r.model.tenant == tenant)
            if held >= self._max_per_tenant:
                raise InvalidRequestError(f"this tenant holds {held} models; allowed: at most {self._max_per_tenant} "
                                          "(COLO_MAX_MODELS_PER_TENANT); unload_model one first")
            adapter = make(trainer)
            rank = trainer.adapters[adapter].lora.rank
            with self._lock:
                self._records[model_id] = _Record(Model(tenant, model_id, session_id, adapter, rank))
            return model_id

        return self._worker.call(run)

    def drop(self, model_id: str) -> Future:
        """Forget the model now; the returned job deletes its adapter and its frozen copies."""
        with self._lock:
            r = self._records.pop(model_id, None)
            if r is not None:
                self._stop_waiting(r, ColoError(f"model {model_id} was deleted before this request ran"))

        def delete(trainer: Trainer) -> str:
            if r is not None:
                trainer.delete_lora(r.model.adapter)
            self._checkpoints.drop_frozen(trainer, model_id)
            return model_id

        return self._worker.call(delete)

    def drop_session(self, session_id: str) -> None:
        for model_id in self.of_session(session_id):
            self.drop(model_id)

    def close(self) -> None:
        """The service stops: waiting requests are answered, new ones refused."""
        with self._lock:
            self._closed = True
            for r in self._records.values():
                self._stop_waiting(r, ShuttingDown("the server is shutting down; this request was not run"))

    # ---- training requests ------------------------------------------------------------------------

    def ordered(self, tenant: str, model_id: str, seq_id: int | None, job: Job, encode: Encode) -> dict:
        """Run ``job(trainer, model)`` in the model's ``seq_id`` order; answers ``{request_id}``."""
        if seq_id is None:
            raise InvalidRequestError("seq_id is missing; allowed: the training client's request counter + 1")
        with self._lock:
            r = self._record(tenant, model_id)
            r.last_request = time.time()
            if seq_id in r.seen:  # the SDK re-sent a POST whose answer it lost
                return {"request_id": r.seen[seq_id]}
            if self._closed:
                raise ShuttingDown("the server is shutting down; no new requests are taken")
            if seq_id < r.next_seq or seq_id in r.parked:
                raise ColoError(f"seq_id {seq_id} of model {model_id} was already used; allowed: each seq_id once, "
                                f"the next is {r.next_seq}")
            if seq_id > r.next_seq + MAX_SEQ_AHEAD:
                raise ColoError(f"seq_id {seq_id} of model {model_id} is far ahead of the next one ({r.next_seq}); "
                                f"allowed: at most {MAX_SEQ_AHEAD} ahead")
            future: Future = Future()
            request_id = r.seen[seq_id] = self._futures.add(tenant, future, encode)
            if len(r.seen) > SEEN_PER_MODEL:  # a retry comes within seconds: forget the oldest half
                for old in sorted(r.seen)[: SEEN_PER_MODEL // 2]:
                    del r.seen[old]
            r.parked[seq_id] = (job, future)
            self._release(r)
        return {"request_id": request_id}

    def _record(self, tenant: str, model_id: str) -> _Record:
        with self._lock:
            r = self._records.get(model_id)
            if r is None or r.model.tenant != tenant:
                raise NotFound(f"unknown model {model_id!r}; create_model makes one")
            return r

    def _release(self, r: _Record) -> None:
        """Under the lock: hand the model's next job to the worker if it is its turn, else watch the gap."""
        if r.busy or self._closed or self._records.get(r.model.model_id) is not r:
            return
        if r.next_seq not in r.parked:
            if r.parked and r.gap is None:
                r.gap = threading.Timer(GAP_SECONDS, self._skip_gap, (r,))
                r.gap.daemon = True
                r.gap.start()
            return
        if r.gap is not None:
            r.gap.cancel()
            r.gap = None
        job, future = r.parked.pop(r.next_seq)
        r.next_seq += 1
        r.busy = True
        try:
            done = self._worker.call(lambda trainer: job(trainer, r.model), kind="train")
        except ShuttingDown as e:
            r.busy = False
            future.set_exception(e)
            return
        done.add_done_callback(lambda d: self._finished(r, d, future))

    def _finished(self, r: _Record, done: Future, future: Future) -> None:
        error = done.exception()
        if error is None:
            future.set_result(done.result())
        else:
            future.set_exception(error)
        with self._lock:
            r.busy = False
            self._release(r)

    def _skip_gap(self, r: _Record) -> None:
        with self._lock:
            if r.gap is not threading.current_thread():  # the gap closed (or the model went) meanwhile
                return
            r.gap = None
            lowest = min(r.parked)
            log.warning("model %s: seq_id %d never came in %.0f s; going on with %d", r.model.model_id, r.next_seq,
                        GAP_SECONDS, lowest)
            r.next_seq = lowest
            self._release(r)

    def _stop_waiting(self, r: _Record, error: ColoError) -> None:
        if r.gap is not None:
            r.gap.cancel()
            r.gap = None
        for _, future in r.parked.values():
            future.set_exception(error)
        r.parked.clear()
