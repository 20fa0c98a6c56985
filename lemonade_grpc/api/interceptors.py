"""Server interceptors: a request whose bytes do not decode is INVALID_ARGUMENT `MALFORMED_REQUEST`.

grpc.aio decodes a request before any servicer code runs, and a decode error
escapes as UNKNOWN "Unexpected DecodeError" with no ErrorInfo (issue 9,
finding 10), for our services and for Health and reflection alike. The
interceptor swaps each method handler's deserializer for one that cannot
raise: on bad bytes it returns a `_Malformed` marker instead of a message,
and the wrapped behaviour answers the marker with INVALID_ARGUMENT and a
google.rpc.Status carrying ErrorInfo reason `MALFORMED_REQUEST` (domain
lemonade.v1), before the servicer sees it. Request streams are wrapped so
that the first undecodable message ends the call the same way.

Cost: the wrapped handler of each method is built once and cached, so a
call pays a dict lookup and an identity check to find it, and one extra
frame each around the deserializer and the behaviour (an async generator's
around every streamed message). Measured with timeit against the unwrapped
handler on the 2-core machine, loaded: about 0.55 µs a unary call (0.1 the
lookup, 0.2 the deserializer, 0.25 the behaviour) and 0.065 µs a streamed
message, against a `Status` round trip of 0.7-1.7 ms (docs/performance.md).
(issue 18 finding 14: this paragraph used to cite a micro-benchmark in
tests/test_api_errors.py that never existed.)

Every handler kind grpc.aio runs is covered: coroutine, async generator and
sync (run in a thread pool: Health's List is one), for all four shapes. Not
covered: a servicer reading its request stream with `context.read()`
instead of the request iterator would receive the marker itself (none here
does).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NoReturn, TypeAlias, TypeVar, cast

import grpc

from lemonade_grpc.api import errors
from lemonade_grpc.core.errors import MalformedRequest

Request = TypeVar("Request")
Response = TypeVar("Response")
# Strings: grpc's classes are generic in the stubs only.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

# A handler is cached per method name; a generic handler that serves any name
# could otherwise grow the cache with every name a client makes up.
MAX_CACHED_METHODS = 1024


class _Malformed:
    """What the guarded deserializer returns for bytes that are not a message of the request type."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _guarded(deserializer: Callable[[bytes], object]) -> Callable[[bytes], object]:
    """`deserializer` that returns a `_Malformed` marker instead of raising."""

    def deserialize(raw: bytes) -> object:
        try:
            return deserializer(raw)
        except Exception as error:  # any failure to decode the client's bytes is the client's
            return _Malformed(str(error) or type(error).__name__)

    return deserialize


def _malformed(method: str, request: _Malformed) -> grpc.Status:
    return errors.to_status(
        MalformedRequest(f"{method}: the request is not a valid protobuf message: {request.error}")
    )


async def _reject(context: Context, method: str, request: _Malformed) -> NoReturn:
    """End the call with INVALID_ARGUMENT `MALFORMED_REQUEST`. Never returns."""
    status = _malformed(method, request)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("context.abort returned")  # pragma: no cover


def _reject_sync(context: grpc.ServicerContext, method: str, request: _Malformed) -> NoReturn:
    """`_reject` for a sync behaviour (run in grpc.aio's thread pool, with a sync context)."""
    status = _malformed(method, request)
    # Set apart: the sync context's abort (in the stubs) takes no trailers;
    # grpc.aio's abort sends the ones set when it is given none.
    context.set_trailing_metadata(status.trailing_metadata)
    context.abort(status.code, status.details)
    raise AssertionError("context.abort returned")  # pragma: no cover


async def _checked(requests: AsyncIterator[object], context: Context, method: str) -> AsyncIterator[object]:
    """`requests`, ending the call at the first one that did not decode."""
    async for request in requests:
        if type(request) is _Malformed:
            await _reject(context, method, request)
        yield request


def _checked_sync(requests: Iterator[object], context: grpc.ServicerContext, method: str) -> Iterator[object]:
    """`_checked` for the sync request iterator grpc.aio hands a sync behaviour."""
    for request in requests:
        if type(request) is _Malformed:
            _reject_sync(context, method, request)
        yield request


def _guard_async(behaviour: Callable[..., Any], method: str, request_streaming: bool) -> Callable[..., Any]:
    """A coroutine function that rejects a malformed request, then runs `behaviour` (a coroutine function)."""
    if request_streaming:

        async def stream_request(requests: AsyncIterator[object], context: Context) -> Any:
            return await behaviour(_checked(requests, context, method), context)

        return stream_request

    async def unary_request(request: object, context: Context) -> Any:
        if type(request) is _Malformed:
            await _reject(context, method, request)
        return await behaviour(request, context)

    return unary_request


def _guard_async_generator(
    behaviour: Callable[..., Any], method: str, request_streaming: bool
) -> Callable[..., AsyncIterator[object]]:
    """An async generator function that rejects a malformed request, then yields `behaviour`'s responses."""
    if request_streaming:

        async def stream_request(requests: AsyncIterator[object], context: Context) -> AsyncIterator[object]:
            async with contextlib.aclosing(behaviour(_checked(requests, context, method), context)) as rs:
                async for response in rs:
                    yield response

        return stream_request

    async def unary_request(request: object, context: Context) -> AsyncIterator[object]:
        if type(request) is _Malformed:
            await _reject(context, method, request)
        # aclosing: closing this generator closes the servicer's at once, not at garbage collection.
        async with contextlib.aclosing(behaviour(request, context)) as responses:
            async for response in responses:
                yield response

    return unary_request


def _guard_sync(
    behaviour: Callable[..., Any], method: str, request_streaming: bool, response_streaming: bool
) -> Callable[..., Any]:
    """A sync function (a generator function for a response stream) that rejects a malformed request."""

    def checked(request: object, context: grpc.ServicerContext) -> object:
        if request_streaming:
            return _checked_sync(cast(Iterator[object], request), context, method)
        if type(request) is _Malformed:
            _reject_sync(context, method, request)
        return request

    if response_streaming:

        def stream_response(request: object, context: grpc.ServicerContext) -> Iterator[object]:
            yield from behaviour(checked(request, context), context)

        return stream_response

    def unary_response(request: object, context: grpc.ServicerContext) -> Any:
        return behaviour(checked(request, context), context)

    return unary_response


def _guard_behaviour(handler: Handler, method: str) -> Callable[..., Any] | None:
    """`handler`'s behaviour wrapped to reject a malformed request; None when it has none."""
    if handler.request_streaming:
        found = handler.stream_stream if handler.response_streaming else handler.stream_unary
    else:
        found = handler.unary_stream if handler.response_streaming else handler.unary_unary
    if found is None:
        return None
    behaviour = cast(Callable[..., Any], found)  # the stubs type behaviours for the sync server
    # grpc.aio picks how to run a behaviour by its kind (coroutine, async
    # generator, or sync in a thread pool), so each wrapper is of the kind of
    # what it wraps. Health's List, for one, is a sync method.
    if inspect.iscoroutinefunction(behaviour):
        return _guard_async(behaviour, method, handler.request_streaming)
    if inspect.isasyncgenfunction(behaviour):
        return _guard_async_generator(behaviour, method, handler.request_streaming)
    return _guard_sync(behaviour, method, handler.request_streaming, handler.response_streaming)


# The method-handler constructor for each (request streaming, response streaming) shape.
HANDLER_CONSTRUCTORS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def guard(handler: Handler, method: str) -> Handler:
    """`handler` with a deserializer that cannot raise and a behaviour that rejects what it could not decode.

    A handler without a deserializer (it takes raw bytes) or without a
    behaviour is returned unchanged.
    """
    if handler.request_deserializer is None:
        return handler
    behaviour = _guard_behaviour(handler, method)
    if behaviour is None:
        return handler
    constructor = HANDLER_CONSTRUCTORS[handler.request_streaming, handler.response_streaming]
    return constructor(
        behaviour,
        request_deserializer=_guarded(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


class WrappedHandlers:
    """Each method's handler wrapped by `wrap(handler, method)`, made once and kept.

    A method's entry is made again if the handler found for it changed. At
    most `MAX_CACHED_METHODS` are kept (past that, wrapped on each call): a
    generic handler that serves any name could otherwise grow it with every
    name a client makes up.
    """

    def __init__(self, wrap: Callable[[Handler, str], Handler]) -> None:
        self._wrap = wrap
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}  # method -> (as found, wrapped)

    def get(self, handler: Handler, method: str) -> Handler:
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        if len(self._wrapped) < MAX_CACHED_METHODS:
            self._wrapped[method] = (handler, wrapped)
        return wrapped


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answers undecodable request bytes with INVALID_ARGUMENT `MALFORMED_REQUEST`, for every service.

    Safe to share by any number of calls; it keeps no per-call state.
    """

    def __init__(self) -> None:
        self._guarded = WrappedHandlers(guard)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Request, Response] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Request, Response] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        guarded = self._guarded.get(handler, handler_call_details.method)
        return cast("grpc.RpcMethodHandler[Request, Response]", guarded)
