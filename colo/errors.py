"""Typed errors. Every bad input raises one of these before any state is touched.

The HTTP service maps ``ColoError`` subclasses to 4xx answers, so the message of each must say
what was wrong and what is allowed, in one line, without a traceback.
"""


class ColoError(Exception):
    """Base class of every error colo raises on purpose."""


class ConfigError(ColoError, ValueError):
    """A configuration value is invalid (names the variable, the value and what is allowed)."""


class InvalidRequestError(ColoError, ValueError):
    """A request is malformed: empty batch, tokens outside the vocabulary, wrong tensor shapes..."""


class ContextLengthError(InvalidRequestError):
    """A prompt or training sequence is longer than the model's context."""


class UnknownAdapterError(ColoError, KeyError):
    """No adapter has this id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(ColoError):
    """A checkpoint cannot be written or read; the previous one, if any, is left as it was."""


class EngineError(ColoError):
    """The inference engine cannot serve the request (unavailable, or missing a capability)."""


class RanksError(ColoError):
    """Under several ranks: the others did not answer a collective in time (one died or hangs)."""
