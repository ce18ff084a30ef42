"""The Tinker API service: the HTTP routes over one ``Service``, whose parts each own one concept
(``server`` lists them), and the worker thread that owns the Trainer.

Data flows one way: a route parses a request (``http``, ``tinker_wire``), makes one call on the
service (``training``, ``sampling``, ``runs``, ``sessions``), which looks up what the request names
(another tenant's ids read as unknown) and starts one job on the worker (``worker``), whose result or
error the client polls (``futures``).
"""

from colo.service.app import create_app
from colo.service.server import Service

__all__ = ["Service", "create_app"]
