"""The service's own errors, and the one table that turns any error into an HTTP status.

A lookup by another tenant finds nothing, exactly as if the id did not exist (``NotFound``); a finished
session answers ``Gone``; the worker refuses work while the service stops (``ShuttingDown``). Raised in
a route they answer with their status; raised inside a job they fail the job (``routes_session``
answers a failed job with 200 and ``{error, category}``, since the SDK retries any 5xx forever).
"""

from __future__ import annotations

from colo.errors import ColoError, EngineError


class NotFound(ColoError):
    """An id this tenant does not have."""


class Forbidden(ColoError):
    """A signed URL that is not valid: changed, or past its expiry."""


class Gone(ColoError):
    """A session its client finished."""


class ShuttingDown(EngineError):
    """The service is stopping; the job was not run."""


class HTTPError(Exception):
    """What only HTTP has words for (401, 413, 415): raised while a route parses its request."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# first match wins: the subclasses before ColoError; EngineError (ShuttingDown included) is the server's 503
_STATUS = ((NotFound, 404), (Forbidden, 403), (Gone, 410), (EngineError, 503), (ColoError, 400))


def status_of(e: BaseException) -> int | None:
    """The HTTP status of an error a route raises; None for an unexpected one (500)."""
    if isinstance(e, HTTPError):
        return e.status
    return next((status for kind, status in _STATUS if isinstance(e, kind)), None)
