"""The Tinker API service: the HTTP routes, the state they share, the worker thread that owns the Trainer,
request futures, tenants, the checkpoint store, the wire format and the stability records.

Data flows one way: a route parses a request (``http``, ``tinker_wire``), looks up what it names in the
state (``state``; another tenant's ids read as unknown), and submits one job to the worker (``worker``),
whose result or error the client polls (``futures``).
"""

from colo.service.app import create_app
from colo.service.server import Service

__all__ = ["Service", "create_app"]
