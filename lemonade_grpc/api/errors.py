"""Domain errors to gRPC statuses with rich details (google.rpc.Status).

Every non-OK status carries an ErrorInfo (domain "lemonade.v1", the error's
reason) and, when a request field is at fault, a BadRequest naming it.

The servicer wrappers (`unary`, `stream`) are the last line of the contract
"no request, however malformed, gets UNKNOWN or INTERNAL without details":
a `LemonadeError` ends the call with its own status; the control plane running
out of file descriptors or memory is RESOURCE_EXHAUSTED
`SERVER_RESOURCES_EXHAUSTED` (never blamed on a backend); anything else is a
bug of ours, logged with its traceback and answered INTERNAL `INTERNAL_ERROR`
without the details (they may quote the request or the host).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from lemonade_grpc.core.errors import (
    ErrorKind,
    InternalError,
    LemonadeError,
    exhausted_resource,
    server_resources_exhausted,
)

__all__ = ["abort", "exhausted_resource", "server_resources_exhausted", "stream", "to_status", "unary"]

log = logging.getLogger(__name__)

DOMAIN = "lemonade.v1"

# The most a status message (and a BadRequest description) may take, in UTF-8
# bytes. The message travels twice in the trailers (grpc-message, percent-
# encoded, and inside grpc-status-details-bin, base64), and the client drops
# trailers over its metadata limit (8 KiB soft by default): a 1 MB model name
# echoed whole became RESOURCE_EXHAUSTED "received metadata size exceeds hard
# limit" (issue 9, finding 9). 1 KiB stays under that limit even when every
# byte is percent-encoded.
MAX_MESSAGE_BYTES = 1024
ELLIPSIS = "…"
_ELLIPSIS_BYTES = len(ELLIPSIS.encode())

INTERNAL_MESSAGE = "internal error (see the server log)"

_CODES = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.ABORTED: grpc.StatusCode.ABORTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
}


Request = TypeVar("Request")
Response = TypeVar("Response")
Servicer = TypeVar("Servicer")


def bounded(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, ending in "…" when cut. Pure.

    The cut never splits a character; characters that cannot be encoded
    (lone surrogates, from a file name say) become "?" so that gRPC can
    always send the result.
    """
    try:
        data = text.encode()
    except UnicodeEncodeError:
        data = text.encode("utf-8", "replace")
        text = data.decode()
    if len(data) <= limit:
        return text
    # "ignore" drops the partial character the cut may leave at the end.
    return data[: limit - _ELLIPSIS_BYTES].decode("utf-8", "ignore") + ELLIPSIS


def to_status(error: LemonadeError) -> grpc.Status:
    """The gRPC status for `error`, with ErrorInfo and (for a bad field) BadRequest.

    The message is cut to `MAX_MESSAGE_BYTES` (errors never echo unbounded
    input), so the trailers always fit the client's metadata limit.
    """
    code = _CODES[error.kind]
    message = bounded(error.message)
    info = any_pb2.Any()
    metadata = {key: bounded(value, 256) for key, value in error.metadata.items()}
    info.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata))
    details = [info]
    if error.field is not None:
        bad_request = any_pb2.Any()
        bad_request.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=bounded(error.field, 256), description=message
                    )
                ]
            )
        )
        details.append(bad_request)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=details))


async def abort(context: grpc.aio.ServicerContext[Request, Response], error: LemonadeError) -> NoReturn:
    """End the RPC with `error`'s status. Never returns."""
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("context.abort returned")  # pragma: no cover


def _translate(error: Exception, method: str) -> LemonadeError:
    """The `LemonadeError` to answer for an exception that escaped servicer `method`."""
    if isinstance(error, LemonadeError):
        return error
    cause = exhausted_resource(error)
    if cause is not None:
        log.warning("%s: the server ran out of resources: %s", method, error)
        return server_resources_exhausted(cause)
    log.error("%s: unexpected error", method, exc_info=error)
    return InternalError(INTERNAL_MESSAGE)


async def _end(context: grpc.aio.ServicerContext[Request, Response], error: Exception, method: str) -> None:
    """End the RPC with the status `error` translates to; re-raise it if a status was already sent."""
    if context.done():
        # The status went out already (an abort whose error a servicer
        # replaced, say): a second abort would raise UsageError.
        raise error
    await abort(context, _translate(error, method))


def unary(
    method: Callable[[Servicer, Request, grpc.aio.ServicerContext[Request, Response]], Awaitable[Response]],
) -> Callable[[Servicer, Request, grpc.aio.ServicerContext[Request, Response]], Awaitable[Response]]:
    """Wrap a unary servicer method so that every exception ends the call with a status carrying ErrorInfo.

    `LemonadeError`: its status. An OSError of resource exhaustion:
    `SERVER_RESOURCES_EXHAUSTED`. Anything else: `INTERNAL_ERROR`, logged.
    `grpc.aio.AbortError` (the call was aborted already) and cancellation
    pass through untouched.
    """
    name = method.__qualname__

    @functools.wraps(method)
    async def wrapper(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext[Request, Response]
    ) -> Response:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _end(context, error, name)
            raise AssertionError("_end returned") from error  # pragma: no cover

    return wrapper


def stream(
    method: Callable[
        [Servicer, Request, grpc.aio.ServicerContext[Request, Response]], AsyncGenerator[Response, None]
    ],
) -> Callable[
    [Servicer, Request, grpc.aio.ServicerContext[Request, Response]], AsyncGenerator[Response, None]
]:
    """Wrap a server-streaming servicer method like `unary`: any exception ends the stream with ErrorInfo."""
    name = method.__qualname__

    @functools.wraps(method)
    async def wrapper(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext[Request, Response]
    ) -> AsyncGenerator[Response, None]:
        try:
            # aclosing: closing this stream closes the servicer's at once, in order, not at GC.
            async with contextlib.aclosing(method(self, request, context)) as responses:
                async for response in responses:
                    yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _end(context, error, name)

    return wrapper
