"""The authentication interceptor: bearer tokens in the `authorization` metadata, checked per call.

No token (or an unknown one) is UNAUTHENTICATED, a token whose role does
not cover the call is PERMISSION_DENIED, each with ErrorInfo (reason
`UNAUTHENTICATED` / `PERMISSION_DENIED`). The rules are `lemonade_grpc.core.access`'s.
A refused call's handler answers the status at once; the servicer never
runs. Nothing here logs a token.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc

from lemonade_grpc.api import errors
from lemonade_grpc.api.interceptors import HANDLER_CONSTRUCTORS
from lemonade_grpc.core import access
from lemonade_grpc.core.errors import LemonadeError, PermissionDenied, Unauthenticated


def _bearer(metadata: Any) -> bytes:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip().encode("latin-1", "replace")
    return b""


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through when its token's role covers its method (`access.required_role`)."""

    def __init__(self, tokens: access.Tokens) -> None:
        self.tokens = tokens  # replaced whole by a SIGHUP reload; each call reads it once

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        needed = access.required_role(details.method)
        if needed is None:
            return await continuation(details)
        role = self.tokens.role_of(_bearer(details.invocation_metadata))
        error: LemonadeError
        if role is None:
            error = Unauthenticated(
                f"{details.method} needs a token: send `authorization: Bearer <token>` in the metadata"
            )
        elif not access.allows(role, needed):
            error = PermissionDenied(
                f"{details.method} needs an admin token; this one is an {role.value} token"
            )
        else:
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return handler  # an unknown method: gRPC's UNIMPLEMENTED
        return _refusal(handler, errors.to_status(error))


def _refusal(
    handler: grpc.RpcMethodHandler[Any, Any], status: grpc.Status
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of `handler`'s shape that ends every call with `status` before anything runs."""

    async def abort(context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        await context.abort(status.code, status.details, status.trailing_metadata)
        raise AssertionError("context.abort returned")  # pragma: no cover

    async def unary(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> object:
        await abort(context)

    async def streaming(
        request: object, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[object]:
        await abort(context)
        yield None  # pragma: no cover - makes this an async generator

    make = HANDLER_CONSTRUCTORS[(handler.request_streaming, handler.response_streaming)]
    return make(
        streaming if handler.response_streaming else unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
