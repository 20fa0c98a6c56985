"""Telemetry of inference streams: the backend call's span, tokens and time to first token.

`StreamTelemetry` itself does nothing (telemetry off: two cheap calls per
stream, none per token); `RecordingStreams` records. Per stream, not per
token: the relay counts its tokens in a local and reports once at the end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.telemetry.metrics import Instruments

# Yields the headers to send with the backend request, or None.
CallHeaders = AbstractContextManager[dict[str, str] | None]
_NOTHING: CallHeaders = contextlib.nullcontext()
PROPAGATOR = TraceContextTextMapPropagator()


class StreamTelemetry:
    """The relay's hooks; this base records nothing."""

    def backend_call(self, model: str, path: str, backend: Backend) -> CallHeaders:
        """Around the backend's HTTP stream; yields the headers to send with it (trace context), or None."""
        return _NOTHING

    def stream_ended(self, model: str, tokens: int, first_token_seconds: float, outcome: str) -> None:
        """A stream ended: `outcome` is `ok`, `cancelled`, or the error's reason."""


class RecordingStreams(StreamTelemetry):
    """Spans with `tracer`, metrics with `instruments` (either may be a no-op)."""

    def __init__(self, tracer: trace.Tracer, instruments: Instruments | None) -> None:
        self._tracer = tracer
        self._instruments = instruments

    @contextlib.contextmanager
    def _call(self, model: str, path: str, backend: Backend) -> Iterator[dict[str, str] | None]:
        # Started, not made current: this runs inside the relay's generator,
        # which may be closed in another task; a context attached here could
        # not be detached there.
        span = self._tracer.start_span(
            f"POST {path}",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "lemonade.model": model,
                "lemonade.pid": backend.pid,
                "http.request.method": "POST",
                "url.path": path,
                "server.address": "127.0.0.1",
                "server.port": backend.port,
            },
        )
        headers: dict[str, str] = {}
        # A backend that traces (vLLM, say) continues the trace; W3C trace context only, no baggage.
        PROPAGATOR.inject(headers, trace.set_span_in_context(span))
        try:
            yield headers
        except Exception as error:
            span.record_exception(error)
            span.set_status(trace.StatusCode.ERROR, str(error))
            raise
        finally:
            span.end()

    def backend_call(self, model: str, path: str, backend: Backend) -> CallHeaders:
        return self._call(model, path, backend)

    def stream_ended(self, model: str, tokens: int, first_token_seconds: float, outcome: str) -> None:
        span = trace.get_current_span()  # the RPC's: the tracing interceptor makes it current here
        span.set_attribute("lemonade.tokens", tokens)
        if tokens:
            span.set_attribute("lemonade.time_to_first_token_ms", round(first_token_seconds * 1000, 3))
        if self._instruments is None:
            return
        labels = {"model": model}
        self._instruments.streams.add(1, {**labels, "outcome": outcome})
        if tokens:
            self._instruments.tokens.add(tokens, labels)
            self._instruments.time_to_first_token.record(first_token_seconds, labels)
