"""The pool's telemetry for each way a load ends: spans, metrics, one log line per load, unload and crash.

In process first (the SDK's in-memory exporter and reader): with fake
backends, the outcomes a real llama-server cannot be made to show on cue: a
failed start, an eviction, a load cancelled by Unload, a request that
changes nothing. Then against real servers, what an odd interleaving did
(see the docstrings). The end-to-end path (a real OTLP receiver, the
Prometheus endpoint) is in test_service.py.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import eventually, fake_spec, launcher, poll, shut_down
from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.core.catalog import ModelSpec, ModelType
from lemonade_grpc.core.errors import LemonadeError, LoadCancelled
from lemonade_grpc.core.options import EffectiveOptions, RequestedOptions
from lemonade_grpc.core.settings import PoolSettings
from lemonade_grpc.pool.pool import Pool
from lemonade_grpc.telemetry.logs import JSONFormatter
from lemonade_grpc.telemetry.otel import Providers
from lemonade_grpc.telemetry.service import Telemetry
from recorded import Recorded
from serve_telemetry import WAIT_SECONDS


@pytest.fixture
async def recorded(tmp_path: Path, tiny_model: Path) -> AsyncIterator[tuple[Recorded, Pool]]:
    record = Recorded()
    catalog = {
        "a": fake_spec("a", tiny_model),
        "b": fake_spec("b", tiny_model),
        "broken": fake_spec("broken", tiny_model, "--fail-start"),
        "slow": fake_spec("slow", tiny_model, "--load-seconds", "30"),
    }
    pool = Pool(
        catalog,
        PoolSettings(max_loaded={ModelType.LLM: 1}, evict_grace_seconds=0, stop_grace_seconds=1.5),
        launcher(tmp_path / "logs"),
        observer=record.telemetry.observer,
    )
    record.telemetry.observe(pool)
    try:
        yield record, pool
    finally:
        await shut_down(pool)


async def test_an_eviction_is_a_phase_of_the_load_and_an_unload_by_reason(
    recorded: tuple[Recorded, Pool],
) -> None:
    record, pool = recorded
    await pool.load("a", RequestedOptions()).outcome()
    await pool.load("b", RequestedOptions(ctx_size=512)).outcome()
    await pool.load("b", RequestedOptions()).outcome()  # nothing to do: counted, no span
    (load_b,) = record.finished("load b")
    assert load_b.status.status_code is trace.StatusCode.UNSET
    assert dict(load_b.attributes or {})["lemonade.options.ctx_size"] == 512
    phases = record.phases(load_b)
    assert [name for name, _ in phases] == ["queued", "evicting", "starting", "loading"]
    assert phases[1][1] == {"lemonade.evicted": "a", "lemonade.reason": "evicted_lru"}
    assert record.counter("lemonade.unloads", model="a", reason="evicted_lru") == 1
    assert record.counter("lemonade.loads", model="b", outcome="loaded") == 1
    assert record.counter("lemonade.loads", model="b", outcome="already_loaded") == 1
    assert len(record.finished("load b")) == 1


async def test_a_failed_load_is_an_error_span_with_its_reason(recorded: tuple[Recorded, Pool]) -> None:
    record, pool = recorded
    with pytest.raises(LemonadeError) as failure:
        await pool.load("broken", RequestedOptions()).outcome()
    (load,) = record.finished("load broken")
    assert load.status.status_code is trace.StatusCode.ERROR
    assert load.status.description == failure.value.message
    assert dict(load.attributes or {})["lemonade.reason"] == failure.value.reason
    assert [name for name, _ in record.phases(load)] == ["queued", "starting", "loading"]
    assert record.counter("lemonade.loads", model="broken", outcome=failure.value.reason) == 1


async def test_a_load_cancelled_by_unload_ends_its_span(recorded: tuple[Recorded, Pool]) -> None:
    record, pool = recorded
    job = pool.load("slow", RequestedOptions())
    async for progress in job.follow():
        if progress.phase.name == "LOADING":
            break
    await pool.unload("slow")
    with pytest.raises(LoadCancelled):
        await job.outcome()
    (load,) = record.finished("load slow")
    assert dict(load.attributes or {})["lemonade.reason"] == "LOAD_CANCELLED"
    assert record.counter("lemonade.loads", model="slow", outcome="LOAD_CANCELLED") == 1
    assert record.counter("lemonade.unloads", model="slow", reason="requested") == 1


async def test_a_crash_and_its_restart_are_counted_and_the_restart_is_a_root_span(
    tmp_path: Path, tiny_model: Path
) -> None:
    record = Recorded()
    pool = Pool(
        {"crashy": fake_spec("crashy", tiny_model, "--exit-after-seconds", "0.3")},
        PoolSettings(restart_backoff_seconds=0.05, max_restarts=1, stop_grace_seconds=1.5),
        launcher(tmp_path / "logs"),
        observer=record.telemetry.observer,
    )
    try:
        await pool.load("crashy", RequestedOptions(), pinned=True).outcome()

        async def restarted() -> list[ReadableSpan] | None:
            loads = record.finished("load crashy")
            return loads if len(loads) == 2 and record.counter("lemonade.backend.restarts") == 1 else None

        first, again = await poll(restarted, 20, "the restart's load span")
    finally:
        await pool.shutdown()
    assert record.counter("lemonade.unloads", model="crashy", reason="crashed") >= 1
    assert dict(first.attributes or {})["lemonade.origin"] == "request"
    assert dict(again.attributes or {})["lemonade.origin"] == "restart"
    assert again.parent is None  # nobody asked for it: a trace of its own


# ------------------------------------------------- spans: whose trace is it


class JSONLines(logging.Handler):
    """The pool's log records at INFO and above, formatted as the server would (trace ids read at emit)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JSONFormatter())
        self.lines: list[dict[str, Any]] = []
        self._logger = logging.getLogger("lemonade_grpc.pool")
        self._level = self._logger.level

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))

    def __enter__(self) -> JSONLines:
        self._logger.addHandler(self)
        self._logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *_: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


async def test_a_restart_after_a_crash_is_a_root_span_even_when_a_request_loaded_the_model(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Was: the restart's load span is a child of the RPC that first loaded the model, in that
    RPC's trace, long after it ended; the crash and restart log lines carry that RPC's trace id too.
    The docs (and test_telemetry_pool, which loads with no span active) say a restart is a root span.

    Root cause: context propagation through tasks and timers. `Pool.load` spawns the job's task in
    the requester's context (a copy: the RPC span is current in it); `_start` starts the watchdog's
    task from there; the watchdog calls `Supervisor.crashed`, whose `call_later(delay, self._restart)` copies
    that context again; `_restart` calls `load(origin=RESTART)`, and `PoolTelemetry.load_phase`
    starts the load span with no explicit context, so it takes the stale RPC span as parent."""
    record = Recorded()
    pool = Pool(
        {"crashy": fake_spec("crashy", tiny_model, "--exit-after-seconds", "0.5")},
        PoolSettings(restart_backoff_seconds=0.05, max_restarts=1, stop_grace_seconds=1.5),
        launcher(tmp_path / "logs"),
        observer=record.telemetry.observer,
    )
    try:
        with JSONLines() as lines:
            with record.tracer.start_as_current_span("/lemonade.v1.ModelControl/Load") as rpc:
                rpc_trace = format(rpc.get_span_context().trace_id, "032x")
                await pool.load("crashy", RequestedOptions(), pinned=True).outcome()

            async def restarted() -> ReadableSpan | None:
                loads = record.finished("load crashy")
                restart_logged = any(line.get("event") == "restart" for line in lines.lines)
                return loads[1] if len(loads) >= 2 and restart_logged else None

            again = await poll(restarted, WAIT_SECONDS, "the restart's load span")
    finally:
        await pool.shutdown()
    assert dict(again.attributes or {})["lemonade.origin"] == "restart"
    in_rpc_trace = [
        line["event"]
        for line in lines.lines
        if line.get("event") in ("crash", "restart") and line.get("trace_id") == rpc_trace
    ]
    # Today: (False, ["crash", "restart"]).
    assert (again.parent is None, in_rpc_trace) == (True, [])


async def test_an_idle_unload_line_does_not_carry_the_last_requests_trace(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Was: the `unload (idle)` line, logged a whole idle period after the last request ended,
    says trace_id = that request's trace. `Pool.lease`'s finally arms the idle timer with
    `loop.call_later`, which captures the request's context (its span current); `_idle_expired`
    -> `_stop` -> the stop task inherits it, and `PoolTelemetry.unloaded` logs inside it. Readers
    following "a log line leads to its trace" land on an unrelated, finished request."""
    record = Recorded()
    pool = Pool(
        {"m": fake_spec("m", tiny_model)},
        PoolSettings(idle_unload_seconds=1, stop_grace_seconds=1.5),
        launcher(tmp_path / "logs"),
        observer=record.telemetry.observer,
    )
    try:
        with JSONLines() as lines:
            await pool.load("m", RequestedOptions()).outcome()
            with record.tracer.start_as_current_span("/lemonade.v1.Inference/Complete") as rpc:
                request_trace = format(rpc.get_span_context().trace_id, "032x")
                async with pool.lease("m"):
                    pass

            async def idle_line() -> dict[str, Any] | None:
                found = [line for line in lines.lines if line.get("event") == "unload"]
                return found[0] if found else None

            line = await poll(idle_line, WAIT_SECONDS, "the idle unload's log line")
    finally:
        await pool.shutdown()
    assert line["reason"] == "idle"
    assert line.get("trace_id") != request_trace, line


# ------------------------------------------- every way a load ends: no leak


class Tracking(SimpleSpanProcessor):
    """Also remembers the spans started and not (yet) ended."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        super().__init__(exporter)
        self.open: dict[int, str] = {}

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.open[span.context.span_id] = span.name

    def on_end(self, span: ReadableSpan) -> None:
        assert span.context is not None
        self.open.pop(span.context.span_id, None)
        super().on_end(span)


async def test_no_load_span_or_state_is_left_behind_however_the_loads_end(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Holds (guard): joined loads, a load cancelled before its task ran, an Unload of everything
    while a load is evicting a slow-to-stop model, and shutdown with loads running and queued: every
    span started is ended, `PoolTelemetry._loads` ends empty, each job counted exactly once."""
    spans = InMemorySpanExporter()
    tracking = Tracking(spans)
    provider = TracerProvider()
    provider.add_span_processor(tracking)
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    telemetry = Telemetry(
        Providers(
            tracer=provider.get_tracer("t"),
            meter=meters.get_meter("t"),
            tracer_provider=provider,
            meter_provider=meters,
        )
    )
    catalog = {
        "a": fake_spec("a", tiny_model, "--ignore-sigterm"),
        "b": fake_spec("b", tiny_model),
        "slow": fake_spec("slow", tiny_model, "--load-seconds", "30"),
        "c": fake_spec("c", tiny_model),
    }
    pool = Pool(
        catalog,
        PoolSettings(max_loaded={ModelType.LLM: 1}, evict_grace_seconds=0, stop_grace_seconds=1.0),
        launcher(tmp_path / "logs", stop_grace=1.0),
        observer=telemetry.observer,
    )
    telemetry.observe(pool)
    jobs = []
    try:
        # Joined: one job, one span.
        first, second = pool.load("b", RequestedOptions()), pool.load("b", RequestedOptions())
        assert first is second
        await first.outcome()
        # Cancelled before its task ever ran.
        jobs.append(pool.load("c", RequestedOptions()))
        await pool.unload("c")
        # Unload of everything while a load evicts "a" (which ignores SIGTERM: a long stop).
        await pool.load("a", RequestedOptions()).outcome()
        evicting = pool.load("b", RequestedOptions())
        async for progress in evicting.follow():
            if progress.phase.name == "EVICTING":
                break
        await pool.unload("")
        jobs.append(evicting)
        # Shutdown with one load running and one queued behind it.
        jobs.append(pool.load("slow", RequestedOptions()))
        jobs.append(pool.load("c", RequestedOptions()))

        def slow_running() -> bool:
            flight = pool.snapshot().load_in_flight
            return flight is not None and flight.model == "slow"

        await eventually(slow_running, 10, "slow's load to run")  # was a 0.3 s sleep (issue 18 finding 12)
    finally:
        await pool.shutdown()
    for job in jobs:
        assert job.done
    assert telemetry.observer._loads == {}
    assert tracking.open == {}, tracking.open
    data = reader.get_metrics_data()
    assert data is not None
    counted = 0.0
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "lemonade.loads":
                    for point in metric.data.data_points:
                        counted += point.value  # type: ignore[union-attr]
    assert counted == 6  # b, c, a, b (evicting), slow, c


# ------------------------------------------------------ the load span's facts


async def test_the_load_span_names_the_pid_that_serves_after_a_port_retry(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Was: when `Backend.launch` retries on another port (PortTaken: someone took the port
    between our choice and the backend's bind), `on_spawned` runs once per process, each time
    with `lemonade.pid`; the second call is the same LOADING phase, so `PoolTelemetry.load_phase`
    only adds an event and returns before `load.span.set_attribute("lemonade.pid", ...)`: the load
    span keeps the pid of the process that was killed, while the log line says the right one.
    (Simulated here: the launcher reports a first, lost process before the real one.)"""
    record = Recorded()
    real = launcher(tmp_path / "logs")

    class Lost:
        pid = 999_999  # the first attempt's process, stopped after losing its port

    async def retrying(
        spec: ModelSpec, options: EffectiveOptions, *, on_spawned: Callable[[Backend], None], **more: Any
    ) -> Backend:
        on_spawned(cast(Backend, Lost()))
        return await real(spec, options, on_spawned=on_spawned, **more)

    pool = Pool(
        {"m": fake_spec("m", tiny_model)},
        PoolSettings(stop_grace_seconds=1.5),
        retrying,
        observer=record.telemetry.observer,
    )
    try:
        result = await pool.load("m", RequestedOptions()).outcome()
    finally:
        await pool.shutdown()
    (load,) = record.finished("load m")
    assert dict(load.attributes or {})["lemonade.pid"] == result.model.pid


async def test_a_queued_load_span_has_an_event_per_queue_move(tmp_path: Path, tiny_model: Path) -> None:
    """Was (docs vs code): docs/observability.md shows `queued (an event per queue move)`, but
    the `queued` span of a load that moved from place 2 to place 1 has no event. `Loader._progress`
    calls the hook only when the phase changes or attributes are given, and `_announce_queue`
    passes the new position as `queue_position`, not as attributes, so `load_phase` never hears of
    a move (and could not say where to: the position is not in its arguments)."""
    record = Recorded()
    pool = Pool(
        {name: fake_spec(name, tiny_model, "--load-seconds", "0.5") for name in ("a", "b", "c")},
        PoolSettings(max_loaded={ModelType.LLM: 3}, stop_grace_seconds=1.5),
        launcher(tmp_path / "logs"),
        observer=record.telemetry.observer,
    )
    try:
        jobs = [pool.load(name, RequestedOptions()) for name in ("a", "b", "c")]
        for job in jobs:
            await job.outcome()
    finally:
        await pool.shutdown()
    (load_c,) = record.finished("load c")
    assert load_c.context is not None
    (queued,) = [
        s
        for s in record.spans.get_finished_spans()
        if s.name == "queued" and s.parent is not None and s.parent.span_id == load_c.context.span_id
    ]
    assert len(queued.events) >= 1, "c went from place 2 to 1 to running: no event says so"
