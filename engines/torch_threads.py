"""Torch's CPU thread count, kept for the trainer while an in-process engine wants its own.

vLLM 0.33's CUDA worker sets ``torch.set_num_threads(1)`` for the whole process when it starts
(``gpu_worker.py`` -> ``utils/torch_utils.set_torch_threads_for_runtime``, unless OMP_NUM_THREADS is
set), and compiles its model under that count (Dynamo guards on it). In one process with the trainer,
that would leave data preparation and every CPU-side op of training on one thread. So the count the
trainer had is put back once the engine has started, and the engine's own count is set around its
calls only. vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op after binding its
threads; ``torch._C`` keeps the real one, which is what is called here.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def _set(count: int) -> None:
    torch._C.set_num_threads(count)


class ThreadCounts:
    def __init__(self) -> None:
        self.trainer = torch.get_num_threads()
        self.engine = self.trainer

    @contextmanager
    def starting_engine(self) -> Iterator[None]:
        """Around the engine's start: what the engine set is its own; the trainer's count comes back."""
        try:
            yield
        finally:
            self.engine = torch.get_num_threads()
            if self.engine != self.trainer:
                _set(self.trainer)

    @contextmanager
    def engine_calls(self) -> Iterator[None]:
        """Around a call into the engine: the count it started with, then the trainer's again."""
        if self.engine == self.trainer:
            yield
            return
        _set(self.engine)
        try:
            yield
        finally:
            _set(self.trainer)
