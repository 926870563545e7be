"""What the service layer raises: one class per kind of refusal, no HTTP in it. api/main.py maps each kind to its
status code in one place (ERROR_STATUS), so a function here can be called and tested without a request."""

from __future__ import annotations


class ServiceError(Exception):
    """A request the service refuses; `message` says why in one line, fit to show the caller."""

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequest(ServiceError):
    """Malformed: a field is missing, of the wrong type, unknown, or out of range."""


class NotFound(ServiceError):
    """No such thing, or one the caller may not see (the same answer, so ids do not leak)."""


class Conflict(ServiceError):
    """The thing is not in a state that allows this (a finished job cancelled, a row changing under us)."""


class TooLarge(ServiceError):
    """An upload over a size limit, or an analysis over its memory limit."""


class CannotRun(ServiceError):
    """Well-formed, but this model, data set or server cannot run it (an infeasible budget, mismatched shapes)."""


class QuotaExceeded(ServiceError):
    """Over the caller's share of the service (active jobs, request rate)."""


class Busy(ServiceError):
    """The server cannot take this now; the same request may succeed in a few seconds."""


class StorageFull(ServiceError):
    """The artifact store has no room; nothing was stored."""


__all__ = [
    "Busy",
    "CannotRun",
    "Conflict",
    "InvalidRequest",
    "NotFound",
    "QuotaExceeded",
    "ServiceError",
    "StorageFull",
    "TooLarge",
]
