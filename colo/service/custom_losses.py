"""The custom losses sessions created (``/api/v1/create_custom_loss``), each usable by its own session only.

A loss is checked and built (``colo.custom_loss.build``) when it is created, so a bad graph is refused
there with a 400; what is kept is the built loss, plain data. Its id names the session and the SDK's
``custom_loss_seq_id``: a POST the SDK sends again (it lost the answer) gets the same id, and the same
seq_id with another loss is refused. A lookup by another tenant or session finds nothing (``NotFound``).
Losses of sessions that are gone are forgotten when a tenant creates its next one; a tenant holds at most
``MAX_PER_TENANT``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from tinker import types as tt

from colo.custom_loss import CustomLoss, build
from colo.errors import InvalidRequestError
from colo.service.errors import NotFound

MAX_PER_TENANT = 256


@dataclass(frozen=True)
class _Stored:
    tenant: str
    session_id: str
    request: tt.CreateCustomLossRequest  # to tell a POST sent again from another loss under the same seq_id
    loss: CustomLoss


class CustomLosses:
    def __init__(self) -> None:
        self._lock = threading.RLock()  # _again takes it, also while create holds it
        self._losses: dict[str, _Stored] = {}

    def create(self, tenant: str, req: tt.CreateCustomLossRequest, live_sessions: Callable[[], list[str]]) -> str:
        """The loss's id; the caller has checked that ``req.session_id`` is the tenant's. ``live_sessions``: the
        tenant's sessions now, to forget the losses of the others."""
        loss_id = f"{req.session_id}:loss:{req.custom_loss_seq_id}"
        if self._again(tenant, loss_id, req):
            return loss_id
        loss = build(req.name, [i.model_dump() for i in req.inputs], [n.model_dump() for n in req.graph.nodes])
        live = set(live_sessions())
        with self._lock:
            if self._again(tenant, loss_id, req):  # the same POST, twice at once
                return loss_id
            for stale in [k for k, s in self._losses.items() if s.tenant == tenant and s.session_id not in live]:
                del self._losses[stale]
            held = sum(1 for s in self._losses.values() if s.tenant == tenant)
            if held >= MAX_PER_TENANT:
                raise InvalidRequestError(f"this tenant holds {held} custom losses; allowed: at most {MAX_PER_TENANT} "
                                          "(finish sessions whose losses are no longer used)")
            self._losses[loss_id] = _Stored(tenant, req.session_id, req, loss)
        return loss_id

    def _again(self, tenant: str, loss_id: str, req: tt.CreateCustomLossRequest) -> bool:
        """Whether ``loss_id`` exists as ``req`` made it (a POST sent again); an error if it holds another loss."""
        with self._lock:
            known = self._losses.get(loss_id)
        if known is None:
            return False
        if known.tenant == tenant and known.request == req:
            return True
        raise InvalidRequestError(f"custom_loss_seq_id {req.custom_loss_seq_id} was already used in this session for "
                                  "another loss; allowed: each seq_id once")

    def get(self, tenant: str, session_id: str, loss_id: str) -> CustomLoss:
        """The loss ``loss_id`` if the tenant's session ``session_id`` created it."""
        with self._lock:
            stored = self._losses.get(loss_id)
        if stored is None or stored.tenant != tenant or stored.session_id != session_id:
            raise NotFound(f"unknown custom loss {loss_id!r} for this model's session; "
                           "ServiceClient.create_custom_loss makes one, for the clients of its own session")
        return stored.loss
