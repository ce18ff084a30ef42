"""Sleep/wake of the engine, driven by the Trainer: asleep while training runs, awake to sample."""

from __future__ import annotations

import logging

import torch

from engines.base import InferenceEngine

log = logging.getLogger(__name__)

CREEP_WARN_BYTES = 256 << 20


def device_free_bytes() -> int | None:
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    return None


class SleepControl:
    def __init__(self, engine: InferenceEngine, level: int) -> None:
        self.engine = engine
        self.level = level
        self.asleep = False
        self._said_unsupported = False
        self.free_after_first_wake: int | None = None

    def before_training(self) -> int | None:
        """Put the engine to sleep if it is awake and can; the bytes this sleep freed, if measured."""
        if self.asleep:
            return None
        if not self.engine.capabilities.sleep:
            if not self._said_unsupported:
                log.info("engine %r does not sleep here: training and sampling share memory (nothing to release)",
                         self.engine.name)
                self._said_unsupported = True
            return None
        free_before = device_free_bytes()
        released = self.engine.sleep(self.level)
        free_after = device_free_bytes()
        self.asleep = True
        if released is None:  # the engine cannot count: the change in free memory, which may include others'
            if free_before is None or free_after is None:
                return None
            released = free_after - free_before
        log.info("engine %r asleep (level %d): %.1f MiB reclaimed", self.engine.name, self.level, released / 2**20)
        return released

    def before_sampling(self) -> None:
        if self.asleep:
            self.engine.wake()
            self.asleep = False
            free = device_free_bytes()
            if free is not None:
                # memory not given back across cycles: free memory after each wake should not shrink
                if self.free_after_first_wake is None:
                    self.free_after_first_wake = free
                elif self.free_after_first_wake - free > CREEP_WARN_BYTES:
                    log.warning("engine %r: %.0f MiB less free after this wake than after the first: memory is not "
                                "given back across sleep cycles", self.engine.name,
                                (self.free_after_first_wake - free) / 2**20)
