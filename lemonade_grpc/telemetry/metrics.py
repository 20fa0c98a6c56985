"""The service's metric instruments, and the gauges read from a pool snapshot.

Names follow OpenTelemetry's conventions (dotted, unit apart); the
Prometheus endpoint shows them as `lemonade_loads_total`,
`lemonade_load_phase_duration_seconds_bucket` and so on.

Counters and histograms are recorded where things happen (the pool's hooks,
the end of a stream). Gauges (models per type and state, pins, queues,
streams, backend RSS) are read when a reader collects: from a snapshot of
the pool taken on the event loop's thread, since a reader collects on a
thread of its own (`LoopSnapshots`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from collections.abc import Callable, Iterable

from opentelemetry import metrics

from lemonade_grpc.core.catalog import ModelType
from lemonade_grpc.pool.model import ModelState
from lemonade_grpc.pool.views import PoolView

# Seconds. Load phases run from milliseconds (queued behind nothing) to
# minutes (a 70 GB model from a cold disk).
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Time to first token: a millisecond on a loaded tiny model, seconds with a
# load or a long prompt before it.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

SNAPSHOT_TIMEOUT_SECONDS = 2.0


class LoopSnapshots:
    """`PoolView`s taken on the event loop's thread, for readers collecting on other threads.

    Returns None when the loop does not answer in time or is gone (the
    server is stopping): the gauges then report nothing for that collection.
    Each gauge takes its own snapshot (a hop to the loop, microseconds): a
    snapshot shared by the gauges of one collection went stale between
    collections, and a scrape right after an unload still showed the model.
    """

    def __init__(self, snapshot: Callable[[], PoolView], loop: asyncio.AbstractEventLoop) -> None:
        self._snapshot = snapshot
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def __call__(self) -> PoolView | None:
        if threading.get_ident() == self._loop_thread:
            return self._snapshot()  # a final collection at shutdown runs on the loop itself
        future: concurrent.futures.Future[PoolView] = concurrent.futures.Future()

        def take() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self._snapshot())
                except Exception as error:
                    future.set_exception(error)

        try:
            self._loop.call_soon_threadsafe(take)
            return future.result(SNAPSHOT_TIMEOUT_SECONDS)
        except (RuntimeError, concurrent.futures.TimeoutError):
            future.cancel()
            return None


Observations = Iterable[metrics.Observation]


class Instruments:
    """Every instrument of the service, made from one meter."""

    def __init__(self, meter: metrics.Meter, snapshots: Callable[[], PoolView | None]) -> None:
        self._snapshots = snapshots
        self.loads = meter.create_counter(
            "lemonade.loads", unit="{load}", description="Loads that ended, by model and outcome"
        )
        self.load_phase_duration = meter.create_histogram(
            "lemonade.load.phase.duration",
            unit="s",
            description="Time spent in each load phase (queued, evicting, starting, loading)",
            explicit_bucket_boundaries_advisory=LOAD_BUCKETS,
        )
        self.unloads = meter.create_counter(
            "lemonade.unloads",
            unit="{unload}",
            description="Models that left the pool, by reason (evicted_lru, memory_pressure: evictions)",
        )
        self.restarts = meter.create_counter(
            "lemonade.backend.restarts", unit="{restart}", description="Restarts of crashed pinned models"
        )
        self.tokens = meter.create_counter(
            "lemonade.tokens.streamed", unit="{token}", description="Generated tokens relayed to clients"
        )
        self.streams = meter.create_counter(
            "lemonade.streams", unit="{stream}", description="Inference streams that ended, by outcome"
        )
        self.time_to_first_token = meter.create_histogram(
            "lemonade.time_to_first_token",
            unit="s",
            description="From the request's arrival to its first generated token (any load included)",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS,
        )
        meter.create_observable_gauge(
            "lemonade.models",
            [self._models],
            unit="{model}",
            description="Models in the pool, by type and state",
        )
        meter.create_observable_gauge(
            "lemonade.models.pinned", [self._pinned], unit="{model}", description="Pinned models, by type"
        )
        meter.create_observable_gauge(
            "lemonade.load.queue.length",
            [self._load_queue],
            unit="{load}",
            description="Loads waiting for the load lock (the one running not counted)",
        )
        meter.create_observable_gauge(
            "lemonade.streams.active",
            [self._streams],
            unit="{stream}",
            description="Inference streams running (state=running) or waiting for a slot (state=queued)",
        )
        meter.create_observable_gauge(
            "lemonade.backend.memory.rss",
            [self._rss],
            unit="By",
            description="Resident memory of each model's backend process (its whole process group)",
        )

    def _models(self, _options: metrics.CallbackOptions) -> Observations:
        view = self._snapshots()
        if view is None:
            return []
        counts = collections.Counter((m.type.value, m.state.value) for m in view.models)
        # Zero READY for every type, so a dashboard's line drops to 0 instead of vanishing.
        for kind in ModelType:
            counts.setdefault((kind.value, ModelState.READY.value), 0)
        return [metrics.Observation(n, {"type": t, "state": s}) for (t, s), n in sorted(counts.items())]

    def _pinned(self, _options: metrics.CallbackOptions) -> Observations:
        view = self._snapshots()
        if view is None:
            return []
        counts = collections.Counter({kind.value: 0 for kind in ModelType})
        counts.update(m.type.value for m in view.models if m.pinned)
        return [metrics.Observation(n, {"type": t}) for t, n in sorted(counts.items())]

    def _load_queue(self, _options: metrics.CallbackOptions) -> Observations:
        view = self._snapshots()
        return [] if view is None else [metrics.Observation(len(view.queue))]

    def _streams(self, _options: metrics.CallbackOptions) -> Observations:
        view = self._snapshots()
        if view is None:
            return []
        return [
            metrics.Observation(view.streams_running, {"state": "running"}),
            metrics.Observation(view.streams_queued, {"state": "queued"}),
        ]

    def _rss(self, _options: metrics.CallbackOptions) -> Observations:
        view = self._snapshots()
        if view is None:
            return []
        return [metrics.Observation(m.rss_bytes, {"model": m.name}) for m in view.models if m.pid]
