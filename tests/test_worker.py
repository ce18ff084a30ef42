"""The worker that owns the Trainer: one engine call per sample batch, fairness, shutdown, health.
(A model's seq_id order is ``Models``'s: tests/test_service_models.py.)"""

from __future__ import annotations

import re
import threading
import time

import pytest

from colo.errors import ColoError, EngineError, InvalidRequestError
from colo.types import SampleJob, SamplingParams
from colo.service.worker import ShuttingDown, Worker


class CountingTrainer:
    """The real session Trainer, with its sample_batch calls recorded (not a fake: every call goes through)."""

    def __init__(self, trainer) -> None:
        self._trainer = trainer
        self.batches: list[list[SampleJob]] = []

    def sample_batch(self, jobs):
        self.batches.append(list(jobs))
        return self._trainer.sample_batch(jobs)

    def __getattr__(self, name):
        return getattr(self._trainer, name)


def blocked(worker: Worker) -> threading.Event:
    """Hold the worker in a job until the returned event is set, so requests pile up meanwhile."""
    release, started = threading.Event(), threading.Event()
    worker.call(lambda t: (started.set(), release.wait(30)))
    assert started.wait(30)
    return release


@pytest.fixture
def worker(trainer):
    w = Worker(CountingTrainer(trainer), max_batch_sequences=4)
    yield w
    w.stop()


def job(adapter, prompt, params=SamplingParams(max_tokens=3, temperature=0)):
    return lambda t: SampleJob(adapter, prompt, 1, params)


def test_samples_of_different_clients_and_adapters_share_one_engine_call(worker, make_adapter):
    a, b = make_adapter(seed=1), make_adapter(seed=2)
    release = blocked(worker)
    futures = [worker.sample("client-1", job(a, [1, 2, 3])), worker.sample("client-2", job(b, [4, 5])),
               worker.sample("client-3", job(None, [6, 7, 8, 9]))]
    release.set()
    results = [f.result(60) for f in futures]
    assert len(worker.trainer.batches) == 1 and len(worker.trainer.batches[0]) == 3
    assert [r.adapter for r in results] == [a, b, None]
    assert all(len(r.sequences[0].tokens) == 3 for r in results)


def test_one_bad_sample_fails_alone(worker, make_adapter):
    a = make_adapter()
    release = blocked(worker)
    good = worker.sample("good", job(a, [1, 2]))
    bad = worker.sample("bad", job(a, [1, 10**6]))
    gone = worker.sample("gone", job("lora-does-not-exist", [1, 2]))
    release.set()
    assert good.result(60).sequences
    with pytest.raises(InvalidRequestError, match="token id"):
        bad.result(60)
    with pytest.raises(ColoError, match="unknown adapter"):
        gone.result(60)


def test_a_flooding_client_cannot_crowd_out_another(worker):
    release = blocked(worker)
    flood = [worker.sample("flood", job(None, [1, 2])) for _ in range(10)]
    other = worker.sample("other", job(None, [3, 4]))
    release.set()
    other.result(60)
    for f in flood:
        f.result(60)
    first = worker.trainer.batches[0]
    assert len(first) == 4 and [j.prompt for j in first].count([3, 4]) == 1  # in the first batch of 4


def test_stop_answers_queued_jobs_and_refuses_new_ones(trainer):
    w = Worker(trainer)
    release = blocked(w)
    queued = w.sample("c", job(None, [1, 2]))
    stopper = threading.Thread(target=w.stop)
    stopper.start()
    with pytest.raises(ShuttingDown):
        queued.result(30)
    release.set()
    stopper.join(30)
    with pytest.raises(ShuttingDown):
        w.call(lambda t: None)


class DeadEngineTrainerFake(CountingTrainer):
    """The real session Trainer whose engine calls all fail, as with a dead server (a fake: the failure is
    injected here, since killing a server per test is too slow)."""

    def sample_batch(self, jobs):
        self.batches.append(list(jobs))
        raise EngineError("http://127.0.0.1:1: connection refused")


def test_a_dead_engine_is_not_asked_again_for_every_request_of_a_failed_batch(trainer):
    fake = DeadEngineTrainerFake(trainer)
    w = Worker(fake, max_batch_sequences=16)
    try:
        release = blocked(w)
        futures = [w.sample(f"client-{i}", job(None, [5, 6, 7])) for i in range(6)]
        release.set()
        for f in futures:
            with pytest.raises(EngineError, match="connection refused"):
                f.result(60)
        # the batch, then two requests alone; the other four get the second failure without a call
        assert [len(b) for b in fake.batches] == [6, 1, 1]
    finally:
        w.stop()


def test_the_health_check_tells_a_stalled_worker_from_an_idle_one(trainer, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from colo.service.checkpoint_store import CheckpointStore
    from colo.service import Service, create_app
    from colo.service.tenants import Tenants

    monkeypatch.setattr(trainer.config, "stall_seconds", 1.0)
    service = Service(trainer, Tenants({}), CheckpointStore(tmp_path))
    http = TestClient(create_app(service))  # no lifespan: the session's Trainer stays open
    try:
        time.sleep(1.5)  # idle for longer than the limit is not a stall
        first = http.get("/api/v1/healthz")
        assert first.status_code == 200 and first.json()["worker"]["running"] is None, first.json()
        release = blocked(service.worker)
        service.worker.call(lambda t: None)  # waits behind the held job
        time.sleep(1.5)
        stalled = http.get("/api/v1/healthz")
        assert stalled.status_code == 503, stalled.json()
        body = stalled.json()
        assert body["status"] == "stalled" and body["worker"]["queued"]["control"] == 1, body
        assert re.search(r"finished none of it for \d+ s \(a control job has run for \d+ s\); allowed: 1 s "
                         r"\(COLO_STALL_SECONDS\)", body["reason"]), body
        release.set()
        deadline = time.monotonic() + 10
        while http.get("/api/v1/healthz").status_code != 200:
            assert time.monotonic() < deadline, "the health check never recovered"
            time.sleep(0.1)
    finally:
        service.worker.stop()
