"""What can go wrong with a request, as the engine says it. `serving/errors.py` maps each to an HTTP status."""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine refuses before it runs. `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound: the caller should retry later."""


class RequestFailedError(RuntimeError):
    """A request failed while running (the engine keeps serving the others)."""


class EngineUnavailableError(RuntimeError):
    """The engine cannot run requests right now (its executor died and is restarting, or it is shutting down)."""
