"""OpenTelemetry providers from the standard `OTEL_*` environment variables.

Traces go out by OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and `OTEL_TRACES_EXPORTER` is
not `none`; metrics likewise (`…_METRICS_ENDPOINT`, `OTEL_METRICS_EXPORTER`),
and also through the Prometheus endpoint when one is configured.
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

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import Sampler

log = logging.getLogger(__name__)

SCOPE = "lemonade_grpc"
SERVICE_NAME = "lemonade-grpc"
PROTOCOLS = ("grpc", "http/protobuf")
Signal = Literal["TRACES", "METRICS"]


class TelemetryConfigError(ValueError):
    """An `OTEL_*` variable has a value we cannot act on."""


def _version() -> str:
    # Imported here, when something is exported: importlib.metadata is 2.3 MiB of the serving process.
    import importlib.metadata

    try:
        return importlib.metadata.version("lemonade-grpc")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "0"


def otlp_wanted(env: Mapping[str, str], signal: Signal) -> bool:
    """Whether `signal` is to be exported by OTLP, per the standard variables."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {name.strip() for name in env.get(f"OTEL_{signal}_EXPORTER", "otlp").split(",")}
    if "otlp" not in exporters:
        return False
    return bool(env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


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


def _tracer_provider(env: Mapping[str, str], resource: Resource) -> TracerProvider:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if otlp_protocol(env, "TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
            OTLPSpanExporter,
        )
    # shutdown_on_exit off: `Telemetry.close` flushes, bounded; an atexit flush would block the exit again.
    provider = TracerProvider(resource=resource, sampler=_sampler(env), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def _otlp_metric_reader(env: Mapping[str, str]) -> MetricReader:
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    if otlp_protocol(env, "METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # type: ignore[assignment]
            OTLPMetricExporter,
        )
    return PeriodicExportingMetricReader(OTLPMetricExporter())


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
    want_traces = otlp_wanted(env, "TRACES")
    readers = list(extra_readers)
    if otlp_wanted(env, "METRICS"):
        readers.append(_otlp_metric_reader(env))
    result = Providers()
    if not want_traces and not readers:
        return result
    resource = _resource()
    if want_traces:
        result.tracer_provider = _tracer_provider(env, resource)
        result.tracer = result.tracer_provider.get_tracer(SCOPE, _version())
        log.info("tracing: OTLP over %s", otlp_protocol(env, "TRACES"))
    if readers:
        from opentelemetry.sdk.metrics import MeterProvider

        result.meter_provider = MeterProvider(
            metric_readers=readers, resource=resource, shutdown_on_exit=False
        )
        result.meter = result.meter_provider.get_meter(SCOPE, _version())
    return result
