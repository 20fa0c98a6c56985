"""A real OTLP receiver for tests: the collector's TraceService and MetricsService over gRPC, and HTTP.

It keeps every export request it gets, decoded, and answers as a collector
does. The server under test exports to it through the standard `OTEL_*`
variables (`env()`), with short batch and export intervals.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span

# Export often: a test waits for what it checks by polling the receiver.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_METRIC_EXPORT_INTERVAL": "200"}


def value(any_value: AnyValue) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def attributes(items: Any) -> dict[str, Any]:
    """A span's, resource's or data point's attributes as a dict."""
    return {kv.key: value(kv.value) for kv in items if isinstance(kv, KeyValue)}


@dataclass
class Received:
    """What the receiver got so far."""

    traces: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)

    def spans(self) -> list[Span]:
        return [
            span
            for request in self.traces
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]

    def resources(self) -> list[dict[str, Any]]:
        return [attributes(r.resource.attributes) for request in self.traces for r in request.resource_spans]

    def latest_metrics(self) -> dict[str, Metric]:
        """Each metric by name, from the most recent export that carried it (cumulative values)."""
        latest: dict[str, Metric] = {}
        for request in self.metrics:
            for resource in request.resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        latest[metric.name] = metric
        return latest


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self._received = received

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._received.traces.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, received: Received) -> None:
        self._received = received

    async def Export(
        self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: Any
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        self._received.metrics.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


@dataclass
class Receiver:
    endpoint: str
    protocol: str
    received: Received

    def env(self) -> dict[str, str]:
        """The variables that point a server's exporters here."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": self.protocol,
            **FAST_EXPORT,
        }


@contextlib.asynccontextmanager
async def grpc_receiver() -> AsyncIterator[Receiver]:
    """A collector's OTLP/gRPC endpoint on a free loopback port."""
    received = Received()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(received), server)  # type: ignore[no-untyped-call]
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(received), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Receiver(f"http://127.0.0.1:{port}", "grpc", received)
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def http_receiver() -> AsyncIterator[Receiver]:
    """A collector's OTLP/HTTP endpoint (protobuf bodies on /v1/traces and /v1/metrics)."""
    received = Received()

    async def traces(request: web.Request) -> web.Response:
        received.traces.append(trace_service_pb2.ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(
            body=trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def metrics(request: web.Request) -> web.Response:
        received.metrics.append(
            metrics_service_pb2.ExportMetricsServiceRequest.FromString(await request.read())
        )
        return web.Response(
            body=metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    app.router.add_post("/v1/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Receiver(f"http://127.0.0.1:{port}", "http/protobuf", received)
    finally:
        await runner.cleanup()


def children(spans: list[Span], parent: Span) -> list[Span]:
    """`parent`'s child spans, by start time."""
    return sorted(
        (s for s in spans if s.parent_span_id == parent.span_id and s.trace_id == parent.trace_id),
        key=lambda s: s.start_time_unix_nano,
    )


def named(spans: list[Span], name: str) -> Iterator[Span]:
    return (s for s in spans if s.name == name)
