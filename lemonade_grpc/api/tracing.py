"""A span per call of our services, with the status it really ended with.

Why not the OpenTelemetry gRPC instrumentation's aio interceptor (we used it
first, issue 11): it attaches the span's context inside the response
generator and detaches it when the generator is closed; when grpc.aio
abandons a stream at a `yield` (the client cancelled while the server waited
for it to read), the generators are closed later in another task, and every
such stream logged three "Failed to detach context" errors; it also saw no
status for a cancelled call and left the span saying OK. Here the context is
attached only around each step of the servicer's generator and around its
closing, never across a `yield`, and the servicer's generator is closed
before the span ends, so what it records on the span on its way out is kept.

Attributes follow the RPC semantic conventions (`rpc.system`, `rpc.service`,
`rpc.method`, `rpc.grpc.status_code`); the status is ERROR for the codes the
conventions count as server errors. The trace context comes from the
client's `traceparent` metadata (W3C trace context only: a client's baggage
is not taken in, so it is not passed on to backends either).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from lemonade_grpc.api.interceptors import HANDLER_CONSTRUCTORS, WrappedHandlers

# Spans for our own services only: Health is probed every few seconds by
# load balancers and kubelets, reflection by grpcurl; neither is worth a trace.
TRACED_SERVICE_PREFIX = "/lemonade.v1."

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

PROPAGATOR = TraceContextTextMapPropagator()
# What the semantic conventions call a server's error (the rest are the client's).
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


# A client's deadline passes on its clock first: the server's copy of the
# deadline starts when the request arrives, so a client giving up at its
# deadline reaches a server that still has the request's transit time left
# (under load, tens of milliseconds: a stream at its 0.5 s deadline was
# labelled CANCELLED). A client leaving this close to its deadline is
# counted as its deadline.
DEADLINE_SLACK_SECONDS = 0.25


def _code(context: Context, error: BaseException | None) -> grpc.StatusCode:
    """The status the call ended with, as far as the server can tell."""
    if isinstance(error, grpc.aio.AbortError) or error is None:
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
    if isinstance(error, Exception):
        return grpc.StatusCode.UNKNOWN
    # Cancelled (the client left, or its deadline passed) or closed at a yield.
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= DEADLINE_SLACK_SECONDS
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


class _Call:
    """One traced call: its span and the context that makes the span current."""

    __slots__ = ("context", "span")

    def __init__(self, tracer: trace.Tracer, method: str, attributes: dict[str, str], context: Context):
        carrier = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        parent = PROPAGATOR.extract(carrier)
        kind = trace.SpanKind.SERVER
        self.span = tracer.start_span(method, context=parent, kind=kind, attributes=attributes)
        self.context = trace.set_span_in_context(self.span, parent)

    def end(self, context: Context, error: BaseException | None) -> None:
        code = _code(context, error)
        self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in SERVER_ERRORS:
            details = context.details()
            self.span.set_status(trace.StatusCode.ERROR, details if isinstance(details, str) else code.name)
        self.span.end()


def _traced(handler: Handler, method: str, tracer: trace.Tracer) -> Handler:
    """`handler` with its behaviour in a span; unchanged when its behaviour is not async."""
    if handler.request_streaming:
        return handler  # none of our methods takes a stream
    found = handler.unary_stream if handler.response_streaming else handler.unary_unary
    behaviour = cast(Callable[..., Any], found)
    service, _, name = method.lstrip("/").partition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

    async def unary(request: object, context: Context) -> object:
        call = _Call(tracer, method, attributes, context)
        token = otel_context.attach(call.context)
        try:
            response = await cast(Awaitable[object], behaviour(request, context))
        except BaseException as error:
            call.end(context, error)
            raise
        finally:
            otel_context.detach(token)
        call.end(context, None)
        return response

    async def streaming(request: object, context: Context) -> AsyncIterator[object]:
        call = _Call(tracer, method, attributes, context)
        responses = cast(AsyncIterator[object], behaviour(request, context))
        error: BaseException | None = None
        try:
            while True:
                token = otel_context.attach(call.context)
                try:
                    response = await anext(responses)
                except StopAsyncIteration:
                    break
                finally:
                    otel_context.detach(token)
                yield response
        except BaseException as caught:  # GeneratorExit at the yield when grpc abandons the stream
            error = caught
            raise
        finally:
            token = otel_context.attach(call.context)
            try:
                await responses.aclose()  # type: ignore[attr-defined]
            finally:
                otel_context.detach(token)
                call.end(context, error)

    if handler.response_streaming and inspect.isasyncgenfunction(behaviour):
        wrapped: Callable[..., Any] = streaming
    elif not handler.response_streaming and inspect.iscoroutinefunction(behaviour):
        wrapped = unary
    else:
        return handler
    constructor = HANDLER_CONSTRUCTORS[handler.request_streaming, handler.response_streaming]
    return constructor(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """Spans for the calls whose method starts with `prefix` (our services; not Health, not reflection)."""

    def __init__(self, tracer: trace.Tracer, prefix: str) -> None:
        self._prefix = prefix
        self._traced = WrappedHandlers(functools.partial(_traced, tracer=tracer))

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        method = details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        return self._traced.get(handler, method)
