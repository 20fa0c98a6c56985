"""Telemetry wired to the SDK's in-memory span exporter and metric reader, for in-process tests."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lemonade_grpc.telemetry.otel import Providers
from lemonade_grpc.telemetry.service import Telemetry


class Recorded:
    """`telemetry` records into `spans` and `metrics`; `tracer` makes spans standing for requests."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        meter_provider = MeterProvider(metric_readers=[self.metrics])
        self.tracer = tracer_provider.get_tracer("test")
        self.telemetry = Telemetry(
            Providers(
                tracer=self.tracer,
                meter=meter_provider.get_meter("test"),
                tracer_provider=tracer_provider,
                meter_provider=meter_provider,
            )
        )

    def finished(self, name: str) -> list[ReadableSpan]:
        """The ended spans called `name`."""
        return [s for s in self.spans.get_finished_spans() if s.name == name]

    def phases(self, load: ReadableSpan) -> list[tuple[str, dict[str, Any]]]:
        """(name, attributes) of `load`'s child spans, by start time."""
        assert load.context is not None
        return [
            (s.name, dict(s.attributes or {}))
            for s in sorted(self.spans.get_finished_spans(), key=lambda s: s.start_time or 0)
            if s.parent is not None and s.parent.span_id == load.context.span_id
        ]

    def points(self, name: str) -> list[tuple[dict[str, Any], float]]:
        """(attributes, value) of each data point of metric `name`, collected now."""
        data = self.metrics.get_metrics_data()
        found: list[tuple[dict[str, Any], float]] = []
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            found.append((dict(point.attributes or {}), point.value))  # type: ignore[union-attr]
        return found

    def counter(self, name: str, **labels: str) -> float:
        """The sum of metric `name`'s points whose attributes include `labels`."""
        return sum(value for attributes, value in self.points(name) if labels.items() <= attributes.items())
