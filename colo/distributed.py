"""The ranks of a ``torchrun --nproc_per_node=N`` job (one or several nodes), as the Trainer uses them.

Every rank holds the whole model and its own sampler, on its own device (``cuda:LOCAL_RANK``; CPU
ranks talk over gloo). Scripts are SPMD: every rank makes the same Trainer calls with the same
arguments, and the Trainer splits the work:
- training is data parallel: each rank runs its share of the datums (balanced by tokens), the LoRA
  gradients are summed across ranks before each optimizer step, and every rank applies the same
  AdamW step, so the adapters stay identical;
- sampling is split by rows; each rank samples its share and every rank gets all results in order.

A collective that waits longer than ``timeout`` (a rank died or hangs) raises on the ranks still
alive, and torchrun ends the job; nothing waits forever.
"""

from __future__ import annotations

import datetime
import heapq
import logging
import os
from functools import partial
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from colo.errors import ConfigError, RanksError

log = logging.getLogger(__name__)
T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """Started by torchrun (also with one process): an engine with distributed state of its own joins torchrun's."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


class Ranks:
    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, timeout_seconds: float = 0.0) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.timeout_seconds = timeout_seconds

    @classmethod
    def from_env(cls, device: torch.device, timeout_seconds: float) -> Ranks:
        """One rank under plain ``python``; torchrun's ranks (``WORLD_SIZE`` > 1) joined in a process group."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
        elif dist.get_world_size() != world:
            raise ConfigError(f"a process group of {dist.get_world_size()} ranks is set up, WORLD_SIZE says {world}")
        log.info("colo: rank %d of %d (local rank %d), %s", rank, world, local_rank, dist.get_backend())
        return cls(rank, world, local_rank, timeout_seconds)

    @property
    def main(self) -> bool:
        """The rank that writes files and prints."""
        return self.rank == 0

    def share(self, costs: list[int]) -> list[int]:
        """The indices of ``costs`` this rank takes: largest first, each to the least loaded rank (the same
        answer on every rank), then in their original order."""
        if self.world == 1:
            return list(range(len(costs)))
        loads = [(0, r) for r in range(self.world)]
        mine = []
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            load, r = heapq.heappop(loads)
            if r == self.rank:
                mine.append(i)
            heapq.heappush(loads, (load + costs[i], r))
        return sorted(mine)

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient with its sum over the ranks, in one all-reduce. A gradient no rank
        has stays None (AdamW then skips that parameter, as it does on one rank)."""
        if self.world == 1 or not params:
            return
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        flat = torch.cat([present] + [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                                      for p in params])
        self._collective("the gradient sum", dist.all_reduce, flat)
        offset = len(params)
        for i, p in enumerate(params):
            n = p.numel()
            p.grad = flat[offset: offset + n].view_as(p).to(p.dtype) if flat[i] > 0 else None
            offset += n

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks, in one all-reduce."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        self._collective("summing the loss and token counts", dist.all_reduce, t)
        return t.tolist()

    def most(self, value: int) -> int:
        """The largest of the ranks' ``value``."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._device())
        self._collective("agreeing on the number of micro-batches", partial(dist.all_reduce, op=dist.ReduceOp.MAX), t)
        return int(t.item())

    def gather(self, mine: dict[int, T], count: int) -> list[T]:
        """Every rank's ``{index: item}`` put together: ``count`` items in index order, on every rank.

        The items travel as pickles between this job's own ranks, never from a client."""
        if self.world == 1:
            return [mine[i] for i in range(count)]
        parts: list[Any] = [None] * self.world
        self._collective("gathering results", dist.all_gather_object, parts, mine)
        merged: dict[int, T] = {}
        for part in parts:
            merged.update(part)
        return [merged[i] for i in range(count)]

    def _collective(self, what: str, op, *args) -> None:
        try:
            op(*args)
        except (RuntimeError, dist.DistError) as error:
            raise RanksError(f"rank {self.rank} of {self.world}: {what} failed, another rank died or hangs "
                             f"(each collective waits at most COLO_COLLECTIVE_TIMEOUT_SECONDS="
                             f"{self.timeout_seconds:g} s): {error}") from error

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
