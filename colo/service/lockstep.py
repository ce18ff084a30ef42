"""The service under several ranks: rank 0 serves HTTP, the other ranks follow its Trainer calls in lock step.

The Trainer's collective methods (training, sampling, adapters, checkpoints: those it declares
``@collective``, see ``colo.collective``) must run on every rank with the same arguments. Rank 0's
worker thread calls them through ``Leader``, which first announces each call (its name and arguments)
to the followers; each follower makes the same call on its own Trainer, and the Trainer's own
collectives keep the ranks together from there. Everything else (``@local`` methods, reading
``adapters``, ``config``, ``policy``) stays on rank 0: every rank holds the same state.

Announcements travel over a gloo group of their own whose timeout is long: a follower may wait for
the next request for as long as the service is idle, while the Trainer's collectives keep their
COLO_COLLECTIVE_TIMEOUT_SECONDS. The arguments are the service's own parsed objects, pickled between
this job's ranks; nothing a client sends is unpickled.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import torch.distributed as dist

from colo.collective import check_declared, collective_methods
from colo.errors import ColoError

log = logging.getLogger(__name__)

_IDLE = datetime.timedelta(days=365)


def channel() -> Any:
    """The announcement group; every rank must create it, in the same order, after the Trainer."""
    return dist.new_group(backend="gloo", timeout=_IDLE)


class Leader:
    """Rank 0's Trainer: mirrored calls are announced to the followers before they run here."""

    def __init__(self, trainer, group) -> None:
        check_declared(type(trainer))  # a public method neither collective nor local would go unmirrored
        self._trainer, self._group = trainer, group
        self._mirrored = collective_methods(type(trainer))

    def __getattr__(self, name: str):
        value = getattr(self._trainer, name)
        if name not in self._mirrored:
            return value

        def call(*args, **kwargs):
            dist.broadcast_object_list([(name, args, kwargs)], src=0, group=self._group)
            return value(*args, **kwargs)

        return call


def follow(trainer, group) -> None:
    """A follower rank's life: make each announced call until the leader closes its Trainer."""
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        name, args, kwargs = box[0]
        try:
            getattr(trainer, name)(*args, **kwargs)
        except ColoError as e:
            # the leader met the same error with the same arguments and answers the client with it
            log.debug("rank %d: %s refused as on rank 0: %s", trainer.ranks.rank, name, e)
        if name == "close":
            return
