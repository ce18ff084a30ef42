"""The service's models: each model's training requests in seq_id order, one at a time, de-duplicated;
a gap is skipped after a while; deleting a model or stopping answers what waits."""

from __future__ import annotations

import asyncio

import pytest
from test_worker import blocked

from colo.errors import ColoError
from colo.service import models as models_module
from colo.service.checkpoint_store import CheckpointStore
from colo.service.checkpoints import Checkpoints
from colo.service.errors import NotFound, ShuttingDown
from colo.service.futures import Futures
from colo.service.models import Models
from colo.service.worker import Worker

TENANT = "alice"


def encode(result):
    return result, "json"


@pytest.fixture
def service_parts(trainer, tmp_path):
    worker, futures = Worker(trainer), Futures()
    models = Models(worker, futures, Checkpoints(CheckpointStore(tmp_path)), max_per_tenant=8)
    yield worker, futures, models
    for model_id in models.ids(TENANT):
        models.drop(model_id).result(60)
    worker.stop()


def made(models: Models, *model_ids: str) -> None:
    for model_id in model_ids:
        models.create(TENANT, "s1", model_id, lambda t: t.create_lora(rank=8)).result(60)


def result(futures: Futures, answer: dict):
    item = asyncio.run(futures.retrieve(TENANT, answer["request_id"], timeout=60))
    return item.future.result()


def test_training_requests_run_in_seq_id_order_and_models_take_turns(service_parts):
    worker, futures, models = service_parts
    made(models, "m1", "m2")
    ran: list[tuple[str, int]] = []
    release = blocked(worker)
    answers = [models.ordered(TENANT, "m1", s, lambda t, m, s=s: ran.append((m.model_id, s)), encode) for s in (3, 1, 2)]
    answers += [models.ordered(TENANT, "m2", s, lambda t, m, s=s: ran.append((m.model_id, s)), encode) for s in (2, 1)]
    with pytest.raises(ColoError, match="already used"):
        models.ordered(TENANT, "m1", 0, lambda t, m: None, encode)
    release.set()
    for a in answers:
        result(futures, a)
    assert [s for m, s in ran if m == "m1"] == [1, 2, 3]
    assert [s for m, s in ran if m == "m2"] == [1, 2]
    assert ran.index(("m2", 1)) < ran.index(("m1", 3))  # the models take turns


def test_a_request_sent_again_gets_the_first_ones_request_id_and_runs_once(service_parts):
    worker, futures, models = service_parts
    made(models, "m1")
    ran = []
    first = models.ordered(TENANT, "m1", 1, lambda t, m: ran.append(1), encode)
    again = models.ordered(TENANT, "m1", 1, lambda t, m: ran.append(1), encode)
    assert again == first
    result(futures, first)
    assert ran == [1]
    with pytest.raises(NotFound):  # another tenant's model reads as unknown
        models.ordered("bob", "m1", 2, lambda t, m: None, encode)


def test_a_gap_that_stays_open_is_skipped(service_parts, monkeypatch):
    worker, futures, models = service_parts
    monkeypatch.setattr(models_module, "GAP_SECONDS", 0.2)
    made(models, "m1")
    later = models.ordered(TENANT, "m1", 3, lambda t, m: "ran", encode)
    assert result(futures, later) == "ran"  # seq_ids 1 and 2 never came
    with pytest.raises(ColoError, match="already used.*the next is 4"):
        models.ordered(TENANT, "m1", 1, lambda t, m: None, encode)


def test_deleting_a_model_answers_its_waiting_requests_and_deletes_its_adapter(service_parts, trainer):
    worker, futures, models = service_parts
    made(models, "m1")
    adapter = models.get(TENANT, "m1").adapter
    waiting = models.ordered(TENANT, "m1", 2, lambda t, m: None, encode)
    assert models.drop("m1").result(60) == "m1"
    with pytest.raises(ColoError, match="deleted before this request ran"):
        result(futures, waiting)
    assert adapter not in trainer.adapters and models.find(TENANT, "m1") is None


def test_stopping_answers_waiting_requests_and_refuses_new_ones(service_parts):
    worker, futures, models = service_parts
    made(models, "m1")
    waiting = models.ordered(TENANT, "m1", 2, lambda t, m: None, encode)
    models.close()
    with pytest.raises(ShuttingDown):
        result(futures, waiting)
    with pytest.raises(ShuttingDown):
        models.ordered(TENANT, "m1", 1, lambda t, m: None, encode)
