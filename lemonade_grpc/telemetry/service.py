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
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from lemonade_grpc.core.settings import TelemetrySettings
from lemonade_grpc.pool.views import PoolView
from lemonade_grpc.telemetry import otel
from lemonade_grpc.telemetry.metrics import Instruments, LoopSnapshots
from lemonade_grpc.telemetry.pool_telemetry import PoolTelemetry
from lemonade_grpc.telemetry.streams import RecordingStreams, StreamTelemetry

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.trace import Tracer
    from prometheus_client import CollectorRegistry

    from lemonade_grpc.pool.pool import Pool
    from lemonade_grpc.telemetry.prometheus import MetricsEndpoint

log = logging.getLogger(__name__)

# The longest a stop waits for the exporters to send what they hold.
FLUSH_SECONDS = 3.0


class PrometheusListenError(RuntimeError):
    """The Prometheus endpoint could not listen on its address."""


class Telemetry:
    """What telemetry the settings and environment ask for; no-ops for the rest."""

    def __init__(self, providers: otel.Providers, prometheus: MetricsEndpoint | None = None) -> None:
        self._providers = providers
        self.prometheus = prometheus
        self._snapshots: Callable[[], PoolView | None] = lambda: None
        instruments = Instruments(providers.meter, self._read_pool) if providers.metering else None
        self.observer = PoolTelemetry(providers.tracer, instruments)
        self.streams: StreamTelemetry = (
            RecordingStreams(providers.tracer, instruments)
            if providers.tracing or providers.metering
            else StreamTelemetry()
        )

    @classmethod
    async def start(cls, settings: TelemetrySettings, env: Mapping[str, str] | None = None) -> Telemetry:
        """Providers from `env` (default: the process's), and the Prometheus endpoint if configured.

        Raises `otel.TelemetryConfigError` for an unusable `OTEL_*` value and
        `PrometheusListenError` when the endpoint cannot listen.
        """
        env = os.environ if env is None else env
        # `[telemetry] prometheus_listen` first; else the spec's OTEL_METRICS_EXPORTER=prometheus.
        from_env = otel.prometheus_listen(env)
        listen = settings.prometheus_listen or from_env
        if listen is None:
            return cls(otel.providers(env))
        # Imported here: the endpoint's code is held only by a process that serves one.
        from lemonade_grpc.telemetry.prometheus import MetricsEndpoint

        reader, registry = _prometheus_reader()
        providers = otel.providers(env, (reader,))
        try:
            endpoint = await MetricsEndpoint.start(listen, registry)
        except BaseException:
            await asyncio.to_thread(providers.shutdown)
            raise
        return cls(providers, endpoint)

    @property
    def tracer(self) -> Tracer | None:
        """The tracer of the span-per-RPC interceptor (`api.tracing`) when tracing; else None."""
        return self._providers.tracer if self._providers.tracing else None

    def observe(self, pool: Pool) -> None:
        """Read the gauges from `pool` (call on the event loop's thread)."""
        self._snapshots = LoopSnapshots(pool.snapshot, asyncio.get_running_loop())

    def _read_pool(self) -> PoolView | None:
        return self._snapshots()

    async def close(self, flush_seconds: float = FLUSH_SECONDS) -> None:
        """Stop the endpoint; flush spans and metrics for at most `flush_seconds`, then drop them.

        An exporter retries an unreachable collector with backoff for up to
        its timeout (10 s by default) per signal, one after the other: a stop
        took 13-16 s with the collector down. The flush runs in a daemon
        thread and is abandoned after `flush_seconds`: the process exits on
        time and what was not sent is lost, as it would be anyway.
        """
        if self.prometheus is not None:
            await self.prometheus.close()
        if not (self._providers.tracing or self._providers.metering):
            return
        log.info("telemetry: flushing the exporters (at most %g s)", flush_seconds)
        done = threading.Event()

        def flush() -> None:
            try:
                self._providers.shutdown()
            except Exception:
                log.exception("telemetry: flushing the exporters failed")
            finally:
                done.set()

        threading.Thread(target=flush, name="telemetry-flush", daemon=True).start()
        if not await asyncio.to_thread(done.wait, flush_seconds):
            log.warning(
                "telemetry: the exporters did not flush within %g s (collector unreachable?);"
                " what they held is dropped",
                flush_seconds,
            )


def _prometheus_reader() -> tuple[MetricReader, CollectorRegistry]:
    """A Prometheus reader on a registry of its own, with the control plane's own process metrics."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # the control plane's own CPU, memory and descriptors
    return PrometheusMetricReader(registry=registry), registry
