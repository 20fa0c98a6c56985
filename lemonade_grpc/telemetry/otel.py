"""OpenTelemetry providers from the standard `OTEL_*` environment variables.

`OTEL_TRACES_EXPORTER` and `OTEL_METRICS_EXPORTER` choose the exporters, as
a comma-separated list (`exporters`): `otlp`, `console` (one JSON object a
line on standard output), `none`, and for metrics `prometheus` (a scrape
endpoint on `OTEL_EXPORTER_PROMETHEUS_HOST`:`…_PORT`). Unset, a signal goes
out by OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the signal's own
`…_TRACES_ENDPOINT`, `…_METRICS_ENDPOINT`) is set, and nowhere otherwise:
telemetry is off by default. Metrics also go to the Prometheus endpoint
when `[telemetry] prometheus_listen` configures one.
`OTEL_EXPORTER_OTLP_PROTOCOL` (or the per-signal variable) picks `grpc` (our
default, as the Python distro's) or `http/protobuf`. `OTEL_SDK_DISABLED=true`
turns all of it off. The exporters themselves read the rest of the standard
variables (headers, certificates, timeouts, compression), the batch span
processor `OTEL_BSP_*`, the metric reader `OTEL_METRIC_EXPORT_INTERVAL`, the
sampler `OTEL_TRACES_SAMPLER`, the resource `OTEL_SERVICE_NAME` and
`OTEL_RESOURCE_ATTRIBUTES`.

The SDK and the exporters are imported only when something is exported:
with telemetry off the serving process does not load them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from opentelemetry import metrics, trace

from lemonade_grpc.core.bounds import echo

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricReader, MetricsData
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler

log = logging.getLogger(__name__)

SCOPE = "lemonade_grpc"
SERVICE_NAME = "lemonade-grpc"
PROTOCOLS = ("grpc", "http/protobuf")
Signal = Literal["TRACES", "METRICS"]
# What `OTEL_{signal}_EXPORTER` may name here (the spec's known values that we serve).
EXPORTERS: dict[Signal, tuple[str, ...]] = {
    "TRACES": ("otlp", "console", "none"),
    "METRICS": ("otlp", "console", "prometheus", "none"),
}
# Known to the spec, not served here: what to use instead.
NOT_SERVED = {
    "zipkin": "no Zipkin exporter is installed; use otlp (a collector can forward to Zipkin)",
    "logging": "the deprecated name of console, which new implementations should not take; use console",
    "otlp/stdout": "in development in the spec; use console",
}
PROMETHEUS_HOST = "localhost"  # the spec's defaults for OTEL_EXPORTER_PROMETHEUS_HOST and _PORT
PROMETHEUS_PORT = 9464


class TelemetryConfigError(ValueError):
    """An `OTEL_*` variable has a value we cannot act on."""


def _version() -> str:
    # Imported here, when something is exported: importlib.metadata is 2.3 MiB of the serving process.
    import importlib.metadata

    try:
        return importlib.metadata.version("lemonade-grpc")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "0"


def exporters(env: Mapping[str, str], signal: Signal) -> frozenset[str]:
    """The exporters `OTEL_{signal}_EXPORTER` names (none: an empty set).

    The spec's meanings: a comma-separated list, case-insensitive, `none`
    for no exporter; an empty value is an unset one. Unset, the spec's
    default `otlp` holds only when an OTLP endpoint is set (telemetry is off
    by default here); named, `otlp` exports to the exporter's default
    endpoint (localhost:4317, 4318 for http/protobuf) when none is set.
    `OTEL_SDK_DISABLED=true` turns every exporter off.

    Raises `TelemetryConfigError` naming the variable and its value for a
    name we do not serve, or `none` beside another. The spec says to warn
    and ignore an unknown value; issue 18, finding 13: `console` and typos
    were ignored in silence, and a server exporting nothing when asked to
    export is a mistake found too late, as with the other `OTEL_*` values.
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return frozenset()
    variable = f"OTEL_{signal}_EXPORTER"
    raw = env.get(variable, "")
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    if not names:
        endpoint = env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return frozenset({"otlp"}) if endpoint else frozenset()
    known = EXPORTERS[signal]
    for name in names:
        if name in NOT_SERVED:
            raise TelemetryConfigError(
                f"{variable}={echo(raw)}: {name} is not served here: {NOT_SERVED[name]}"
            )
        if name not in known:
            raise TelemetryConfigError(
                f"{variable}={echo(raw)}: unknown exporter {echo(name)};"
                f" known: {', '.join(known)} (or a comma-separated list of them)"
            )
    if "none" in names and len(set(names)) > 1:
        raise TelemetryConfigError(f"{variable}={echo(raw)}: none cannot be listed with other exporters")
    return frozenset(names) - {"none"}


def otlp_wanted(env: Mapping[str, str], signal: Signal) -> bool:
    """Whether `signal` is to be exported by OTLP, per the standard variables."""
    return "otlp" in exporters(env, signal)


def prometheus_listen(env: Mapping[str, str]) -> str | None:
    """`HOST:PORT` for a Prometheus endpoint when `OTEL_METRICS_EXPORTER` lists `prometheus`, else None.

    `OTEL_EXPORTER_PROMETHEUS_HOST` (default localhost) and `…_PORT` (9464).
    """
    if "prometheus" not in exporters(env, "METRICS"):
        return None
    host = env.get("OTEL_EXPORTER_PROMETHEUS_HOST", "").strip() or PROMETHEUS_HOST
    raw = env.get("OTEL_EXPORTER_PROMETHEUS_PORT", "").strip() or str(PROMETHEUS_PORT)
    if not (raw.isdigit() and int(raw) <= 65535):
        raise TelemetryConfigError(f"OTEL_EXPORTER_PROMETHEUS_PORT={echo(raw)}: must be a port, 0..65535")
    return f"[{host}]:{int(raw)}" if ":" in host else f"{host}:{int(raw)}"


def otlp_protocol(env: Mapping[str, str], signal: Signal) -> str:
    """`grpc` or `http/protobuf`; `TelemetryConfigError` for anything else."""
    variable = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
    if not env.get(variable):
        variable = "OTEL_EXPORTER_OTLP_PROTOCOL"
    protocol = env.get(variable, "").strip() or "grpc"
    if protocol not in PROTOCOLS:
        raise TelemetryConfigError(f"{variable}={protocol!r}: must be one of {', '.join(PROTOCOLS)}")
    return protocol


SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


def _sampler(env: Mapping[str, str]) -> Sampler:
    """The sampler `OTEL_TRACES_SAMPLER` (and `…_ARG`) name; a typo is an error, not "sample everything".

    The SDK, left to read them itself, logs a warning and samples every trace.
    """
    from opentelemetry.sdk.trace import sampling

    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    if name not in SAMPLERS:
        raise TelemetryConfigError(f"OTEL_TRACES_SAMPLER={name!r}: must be one of {', '.join(SAMPLERS)}")
    if not name.endswith("traceidratio"):
        return {
            "always_on": sampling.ALWAYS_ON,
            "always_off": sampling.ALWAYS_OFF,
            "parentbased_always_on": sampling.DEFAULT_ON,
            "parentbased_always_off": sampling.DEFAULT_OFF,
        }[name]
    raw = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip() or "1.0"
    try:
        ratio = float(raw)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise TelemetryConfigError(f"OTEL_TRACES_SAMPLER_ARG={raw!r}: must be a ratio in [0, 1] for {name}")
    if name == "traceidratio":
        return sampling.TraceIdRatioBased(ratio)
    return sampling.ParentBasedTraceIdRatio(ratio)


def _resource() -> Resource:
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.version": _version()})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    return resource


def _span_line(span: ReadableSpan) -> str:
    # One JSON object a line (the SDK's default indents each over ~40 lines): greppable, parseable.
    return str(span.to_json(indent=None)) + "\n"


def _metrics_line(data: MetricsData) -> str:
    return data.to_json(indent=None) + "\n"


def _span_exporter(env: Mapping[str, str], name: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(formatter=_span_line)
    if otlp_protocol(env, "TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    return OTLPSpanExporter()


def _tracer_provider(env: Mapping[str, str], resource: Resource, names: frozenset[str]) -> TracerProvider:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # shutdown_on_exit off: `Telemetry.close` flushes, bounded; an atexit flush would block the exit again.
    provider = TracerProvider(resource=resource, sampler=_sampler(env), shutdown_on_exit=False)
    for name in sorted(names):
        # Batched for the console too: a span's end never waits for a write to standard output.
        provider.add_span_processor(BatchSpanProcessor(_span_exporter(env, name)))
    return provider


def _metric_exporter(env: Mapping[str, str], name: str) -> MetricExporter:
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter(formatter=_metrics_line)
    if otlp_protocol(env, "METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[assignment]
            OTLPMetricExporter,
        )
    return OTLPMetricExporter()


def _metric_readers(env: Mapping[str, str], names: frozenset[str]) -> list[MetricReader]:
    """A periodic reader per push exporter (`prometheus` is served by `Telemetry`, not here)."""
    if not names - {"prometheus"}:
        return []  # and the SDK stays unimported: telemetry off costs nothing
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    return [
        PeriodicExportingMetricReader(_metric_exporter(env, name)) for name in sorted(names - {"prometheus"})
    ]


def _describe(env: Mapping[str, str], signal: Signal, names: frozenset[str]) -> str:
    return ", ".join(f"OTLP over {otlp_protocol(env, signal)}" if n == "otlp" else n for n in sorted(names))


@dataclass
class Providers:
    """The tracer and meter the service uses; no-op ones when nothing is exported."""

    tracer: trace.Tracer = field(default_factory=trace.NoOpTracer)
    meter: metrics.Meter = field(default_factory=lambda: metrics.NoOpMeter(SCOPE))
    tracer_provider: trace.TracerProvider | None = None
    meter_provider: MeterProvider | None = None

    @property
    def tracing(self) -> bool:
        return self.tracer_provider is not None

    @property
    def metering(self) -> bool:
        return self.meter_provider is not None

    def shutdown(self) -> None:
        """Flush what is buffered and stop the exporters (blocking: call it off the event loop)."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()  # type: ignore[attr-defined]
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def providers(env: Mapping[str, str], extra_readers: tuple[MetricReader, ...] = ()) -> Providers:
    """The providers `env` asks for, with `extra_readers` (Prometheus) added to the metrics.

    Raises `TelemetryConfigError` naming the problem when a variable cannot
    be used: the SDK and the exporters read most of them themselves, in
    their constructors, and raise what they raise (`ValueError` for
    `OTEL_EXPORTER_OTLP_TIMEOUT=ten` or an endpoint `http://[::1`, their own
    exception for an unknown compression).
    """
    try:
        return _providers(env, extra_readers)
    except TelemetryConfigError:
        raise
    except Exception as error:
        # Their messages do not say which variable; name those set (not their values: headers hold keys).
        names = ", ".join(sorted(name for name in env if name.startswith("OTEL_")))
        raise TelemetryConfigError(
            f"the OTEL_* environment cannot be used (set: {names}): {str(error) or type(error).__name__}"
        ) from error


def _providers(env: Mapping[str, str], extra_readers: tuple[MetricReader, ...]) -> Providers:
    traces = exporters(env, "TRACES")
    metered = exporters(env, "METRICS")
    readers = [*extra_readers, *_metric_readers(env, metered)]
    result = Providers()
    if not traces and not readers:
        return result
    resource = _resource()
    if traces:
        result.tracer_provider = _tracer_provider(env, resource, traces)
        result.tracer = result.tracer_provider.get_tracer(SCOPE, _version())
        log.info("tracing: %s", _describe(env, "TRACES", traces))
    if metered - {"prometheus"}:
        log.info("metrics: %s", _describe(env, "METRICS", metered - {"prometheus"}))
    if readers:
        from opentelemetry.sdk.metrics import MeterProvider

        result.meter_provider = MeterProvider(
            metric_readers=readers, resource=resource, shutdown_on_exit=False
        )
        result.meter = result.meter_provider.get_meter(SCOPE, _version())
    return result
