"""Sleep/wake driven by the Trainer, and the memory each sleep reclaims.

Real sleep needs CUDA, which these machines lack: this test runs the Trainer's real sleep logic
against a fake CUDA memory reading and an engine that declares sleep, both named as fakes.
"""

import dataclasses
import logging

import colo.sleep
from colo import Datum, SamplingParams


class FakeCudaSleepRecorder:
    def __init__(self):
        self.calls = []
        self.free = 1 << 30

    def sleep(self, level):
        self.calls.append(("sleep", level))
        self.free += 512 << 20  # as if the engine's weights and KV cache left the GPU

    def wake(self):
        self.calls.append(("wake",))
        self.free -= 512 << 20


def with_fake_cuda(trainer, monkeypatch, fake):
    """The Trainer's engine declares sleep and sleeps through ``fake``; free memory is the fake's reading."""
    engine = trainer.engine
    monkeypatch.setattr(engine, "capabilities", dataclasses.replace(engine.capabilities, sleep=True))
    monkeypatch.setattr(engine, "sleep", fake.sleep)
    monkeypatch.setattr(engine, "wake", fake.wake)
    monkeypatch.setattr(colo.sleep, "device_free_bytes", lambda: fake.free)
    return fake


def test_engine_sleeps_for_training_wakes_for_sampling_and_reports_reclaimed_bytes(trainer, adapter, monkeypatch, caplog):
    fake = with_fake_cuda(trainer, monkeypatch, FakeCudaSleepRecorder())
    datum = Datum.from_sequence([3, 4, 5, 6])
    with caplog.at_level(logging.INFO, logger="colo.sleep"):
        first = trainer.forward_backward(adapter, [datum])
        second = trainer.forward_backward(adapter, [datum])  # already asleep: no second sleep
        trainer.optim_step(adapter)
        trainer.sample(adapter, [[3, 4]], 1, SamplingParams(max_tokens=2))
        trainer.forward_backward(adapter, [datum])
        trainer.sample(adapter, [[3, 4]], 1, SamplingParams(max_tokens=2))
    level = trainer.config.sleep_level
    assert fake.calls == [("sleep", level), ("wake",), ("sleep", level), ("wake",)]
    assert first.metrics["engine_sleep_reclaimed_bytes:sum"] == 512 << 20
    assert "engine_sleep_reclaimed_bytes:sum" not in second.metrics
    assert sum("512.0 MiB reclaimed" in r.getMessage() for r in caplog.records) == 2
    assert not trainer.sleep.asleep


class FakeCudaCountingSleeper(FakeCudaSleepRecorder):
    """Counts what it released, as vLLM's allocator does, and leaks 300 MiB a wake (fake CUDA, as above)."""

    def sleep(self, level):
        super().sleep(level)
        return 400 << 20  # free memory also grew by what torch's cache gave back: 512 MiB

    def wake(self):
        super().wake()
        self.free -= 300 << 20


def test_the_engines_own_count_is_reported_and_memory_not_given_back_is_warned(trainer, adapter, monkeypatch, caplog):
    fake = with_fake_cuda(trainer, monkeypatch, FakeCudaCountingSleeper())
    monkeypatch.setattr(trainer.sleep, "free_after_first_wake", None)
    datum = Datum.from_sequence([3, 4, 5, 6])
    with caplog.at_level(logging.INFO, logger="colo.sleep"):
        out = trainer.forward_backward(adapter, [datum])
        for _ in range(2):
            trainer.sample(adapter, [[3, 4]], 1, SamplingParams(max_tokens=2))
            trainer.forward_backward(adapter, [datum])
        trainer.sample(adapter, [[3, 4]], 1, SamplingParams(max_tokens=2))
    assert out.metrics["engine_sleep_reclaimed_bytes:sum"] == 400 << 20  # not the 512 MiB free-memory delta
    creep = [r.getMessage() for r in caplog.records if "not given back" in r.getMessage()]
    assert creep and "600 MiB less free" in creep[-1], creep
