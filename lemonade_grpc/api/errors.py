"""Domain errors to gRPC statuses with rich details (google.rpc.Status).

Every non-OK status carries an ErrorInfo (domain "lemonade.v1", the error's
reason) and, when a request field is at fault, a BadRequest naming it.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from lemonade_grpc.pool.errors import ErrorKind, PoolError

DOMAIN = "lemonade.v1"

_CODES = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.ABORTED: grpc.StatusCode.ABORTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


Request = TypeVar("Request")
Response = TypeVar("Response")
Servicer = TypeVar("Servicer")


def to_status(error: PoolError) -> grpc.Status:
    """The gRPC status for `error`, with ErrorInfo and (for a bad field) BadRequest."""
    code = _CODES[error.kind]
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN))
    details = [info]
    if error.field is not None:
        bad_request = any_pb2.Any()
        bad_request.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
                ]
            )
        )
        details.append(bad_request)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=error.message, details=details))


async def abort(context: grpc.aio.ServicerContext[Request, Response], error: PoolError) -> NoReturn:
    """End the RPC with `error`'s status. Never returns."""
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("context.abort returned")  # pragma: no cover


def unary(
    method: Callable[[Servicer, Request, grpc.aio.ServicerContext[Request, Response]], Awaitable[Response]],
) -> Callable[[Servicer, Request, grpc.aio.ServicerContext[Request, Response]], Awaitable[Response]]:
    """Wrap a unary servicer method so that a `PoolError` ends the call with its status."""

    @functools.wraps(method)
    async def wrapper(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext[Request, Response]
    ) -> Response:
        try:
            return await method(self, request, context)
        except PoolError as error:
            await abort(context, error)

    return wrapper


def stream(
    method: Callable[
        [Servicer, Request, grpc.aio.ServicerContext[Request, Response]], AsyncIterator[Response]
    ],
) -> Callable[[Servicer, Request, grpc.aio.ServicerContext[Request, Response]], AsyncIterator[Response]]:
    """Wrap a server-streaming servicer method so that a `PoolError` ends the stream with its status."""

    @functools.wraps(method)
    async def wrapper(
        self: Servicer, request: Request, context: grpc.aio.ServicerContext[Request, Response]
    ) -> AsyncIterator[Response]:
        try:
            async for response in method(self, request, context):
                yield response
        except PoolError as error:
            await abort(context, error)

    return wrapper
