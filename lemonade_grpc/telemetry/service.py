"""The service's telemetry, assembled once at start-up and closed at the end.

`Telemetry.start(settings, env)` reads `[telemetry]` and the `OTEL_*`
variables and hands out what the server wires in: the pool's observer, the
relay's stream hooks, the gRPC interceptor that makes a span of every call
to our services (when tracing), and `observe(pool)` for the gauges.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from lemonade_grpc.pool.views import PoolView
from lemonade_grpc.telemetry import otel
from lemonade_grpc.telemetry.logs import LogFormat
from lemonade_grpc.telemetry.metrics import Instruments, LoopSnapshots
from lemonade_grpc.telemetry.observer import PoolTelemetry
from lemonade_grpc.telemetry.streams import RecordingStreams, StreamTelemetry

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from lemonade_grpc.pool.pool import Pool

log = logging.getLogger(__name__)

# Spans for our own services only: Health is probed every few seconds by
# load balancers and kubelets, reflection by grpcurl; neither is worth a trace.
TRACED_SERVICE_PREFIX = "/lemonade.v1."


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """`[telemetry]`: the Prometheus endpoint (off by default) and the log format."""

    prometheus_listen: str | None = None
    log_format: LogFormat = "plain"


class PrometheusListenError(RuntimeError):
    """The Prometheus endpoint could not listen on its address."""


def _traced(details: grpc.HandlerCallDetails) -> bool:
    return str(details.method).startswith(TRACED_SERVICE_PREFIX)


class Telemetry:
    """What telemetry the settings and environment ask for; no-ops for the rest."""

    def __init__(self, providers: otel.Providers, prometheus: WSGIServer | None = None) -> None:
        self._providers = providers
        self._prometheus = prometheus
        self._snapshots: Callable[[], PoolView | None] = lambda: None
        instruments = Instruments(providers.meter, self._read_pool) if providers.metering else None
        self.observer = PoolTelemetry(providers.tracer, instruments)
        self.streams: StreamTelemetry = (
            RecordingStreams(providers.tracer, instruments)
            if providers.tracing or providers.metering
            else StreamTelemetry()
        )

    @classmethod
    def start(cls, settings: TelemetrySettings, env: Mapping[str, str] | None = None) -> Telemetry:
        """Providers from `env` (default: the process's), and the Prometheus endpoint if configured.

        Raises `otel.TelemetryConfigError` for an unusable `OTEL_*` value and
        `PrometheusListenError` when the endpoint cannot listen.
        """
        env = os.environ if env is None else env
        readers: tuple[Any, ...] = ()
        prometheus = None
        if settings.prometheus_listen is not None:
            reader, prometheus = _start_prometheus(settings.prometheus_listen)
            readers = (reader,)
        try:
            return cls(otel.providers(env, readers), prometheus)
        except BaseException:
            if prometheus is not None:
                prometheus.shutdown()
            raise

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The span-per-RPC interceptor when tracing, to run outermost; else nothing."""
        if not self._providers.tracing:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self._providers.tracer_provider, filter_=_traced
        )
        return [interceptor]

    def observe(self, pool: Pool) -> None:
        """Read the gauges from `pool` (call on the event loop's thread)."""
        self._snapshots = LoopSnapshots(pool.snapshot, asyncio.get_running_loop())

    def _read_pool(self) -> PoolView | None:
        return self._snapshots()

    def close(self) -> None:
        """Flush spans and metrics, stop the exporters and the endpoint. Blocking: run it in a thread."""
        try:
            self._providers.shutdown()
        except Exception:
            log.exception("telemetry: flushing the exporters failed")
        if self._prometheus is not None:
            self._prometheus.shutdown()
            self._prometheus.server_close()


def _start_prometheus(listen: str) -> tuple[Any, WSGIServer]:
    """A Prometheus reader and its scrape endpoint (HTTP, `GET /metrics`) on `listen` (HOST:PORT)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # the control plane's own CPU, memory and descriptors
    reader = PrometheusMetricReader(registry=registry)
    host, _, port = listen.rpartition(":")
    try:
        server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    except OSError as error:
        raise PrometheusListenError(f"cannot listen on {listen} for Prometheus: {error}") from error
    log.info("prometheus: http://%s:%d/metrics", host, server.server_address[1])
    return reader, server
