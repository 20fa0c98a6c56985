"""Domain errors of the pool. Each carries a stable reason and a kind.

The pool knows nothing of gRPC: `ErrorKind` names the category and the API
layer maps it to a status code (lemonade_grpc.api.errors). The reasons are the
ErrorInfo reasons of the public contract (DESIGN.md "Errors").
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Mapping


class ErrorKind(enum.Enum):
    """What sort of failure this is, independent of any transport."""

    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    ABORTED = "aborted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"


class LemonadeError(Exception):
    """Base of every error the pool reports to a caller.

    `field` names the request field at fault, for INVALID_ARGUMENT errors;
    `metadata` goes into the ErrorInfo (short machine-readable facts).
    """

    kind: ErrorKind = ErrorKind.FAILED_PRECONDITION
    reason: str = "FAILED_PRECONDITION"

    def __init__(
        self, message: str, *, field: str | None = None, metadata: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.metadata = dict(metadata or {})


class ModelNotFound(LemonadeError):
    kind = ErrorKind.NOT_FOUND
    reason = "MODEL_NOT_FOUND"


class CapabilityMissing(LemonadeError):
    """The model cannot serve this request (Embed on a chat model); `metadata["capability"]` says what."""

    kind = ErrorKind.FAILED_PRECONDITION
    reason = "CAPABILITY_MISSING"

    def __init__(self, model: str, capability: str, message: str) -> None:
        super().__init__(message, metadata={"model": model, "capability": capability})


class ModelNotLoaded(LemonadeError):
    kind = ErrorKind.FAILED_PRECONDITION
    reason = "MODEL_NOT_LOADED"


class SlotsPinned(LemonadeError):
    kind = ErrorKind.FAILED_PRECONDITION
    reason = "SLOTS_PINNED"


class InsufficientMemory(LemonadeError):
    kind = ErrorKind.RESOURCE_EXHAUSTED
    reason = "INSUFFICIENT_MEMORY"


class LoadCancelled(LemonadeError):
    kind = ErrorKind.ABORTED
    reason = "LOAD_CANCELLED"


class ModelEvicted(LemonadeError):
    kind = ErrorKind.ABORTED
    reason = "MODEL_EVICTED"


class BackendStartFailed(LemonadeError):
    kind = ErrorKind.UNAVAILABLE
    reason = "BACKEND_START_FAILED"


class BackendCrashed(LemonadeError):
    kind = ErrorKind.UNAVAILABLE
    reason = "BACKEND_CRASHED"


class ShuttingDown(LemonadeError):
    """New work refused, or a stream ended, because the server is stopping."""

    kind = ErrorKind.UNAVAILABLE
    reason = "SHUTTING_DOWN"


class LoadAbortedByShutdown(LemonadeError):
    """A queued or running load ended because the server is stopping."""

    kind = ErrorKind.ABORTED
    reason = "SHUTTING_DOWN"


class StateWriteFailed(LemonadeError):
    """A file of the state directory could not be written (full, read-only, immutable)."""

    kind = ErrorKind.UNAVAILABLE
    reason = "STATE_WRITE_FAILED"


class Overloaded(LemonadeError):
    """More concurrent work than the configured limits and queues allow."""

    kind = ErrorKind.RESOURCE_EXHAUSTED
    reason = "OVERLOADED"


class ServerResourcesExhausted(LemonadeError):
    """The control plane itself ran out of something (file descriptors, memory): not the backend's fault."""

    kind = ErrorKind.RESOURCE_EXHAUSTED
    reason = "SERVER_RESOURCES_EXHAUSTED"


class MalformedRequest(LemonadeError):
    """The request's bytes are not a valid message of its type."""

    kind = ErrorKind.INVALID_ARGUMENT
    reason = "MALFORMED_REQUEST"


class InternalError(LemonadeError):
    """A bug of ours: logged with its traceback, reported without the details."""

    kind = ErrorKind.INTERNAL
    reason = "INTERNAL_ERROR"


class InvalidOptions(LemonadeError):
    kind = ErrorKind.INVALID_ARGUMENT
    reason = "INVALID_OPTIONS"


class InvalidRequest(LemonadeError):
    kind = ErrorKind.INVALID_ARGUMENT
    reason = "INVALID_REQUEST"


class BackendError(LemonadeError):
    """The backend failed a request for a reason of its own (an HTTP 5xx, say)."""

    kind = ErrorKind.UNAVAILABLE
    reason = "BACKEND_ERROR"


class BackendRejected(LemonadeError):
    """The backend refused a request (a prompt too long for the context, say)."""

    kind = ErrorKind.INVALID_ARGUMENT
    reason = "BACKEND_REJECTED"


class Unauthenticated(LemonadeError):
    """The call carries no token, or one the server does not know."""

    kind = ErrorKind.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(LemonadeError):
    """The call's token is valid but its role does not cover the method."""

    kind = ErrorKind.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


# Errnos that say the control plane itself ran out of something. With them,
# a failed connection to a healthy backend is our shortage, not its crash
# (issue 9, finding 7: "Too many open files" reported as BACKEND_CRASHED).
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def exhausted_resource(error: BaseException) -> OSError | None:
    """The OSError behind `error` that says the server ran out of resources, or None. Pure.

    Looks at `error`, its `os_error` (`BackendConnectionError`), and the
    explicit causes (`raise ... from`) down the chain; only an errno in
    `RESOURCE_ERRNOS` counts.
    """
    current: BaseException | None = error
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for candidate in (current, getattr(current, "os_error", None)):
            if isinstance(candidate, OSError) and candidate.errno in RESOURCE_ERRNOS:
                return candidate
        current = current.__cause__
    return None


def server_resources_exhausted(cause: OSError) -> ServerResourcesExhausted:
    """The error for a shortage of ours: names the resource (strerror), never the request."""
    what = os.strerror(cause.errno) if cause.errno is not None else "resources"
    return ServerResourcesExhausted(f"the server ran out of resources ({what}); retry later")
