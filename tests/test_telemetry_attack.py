"""Attacks on the telemetry: what an operator's typo, a hostile scraper or an odd interleaving does.

Each test here showed a defect when it was written (see the docstrings), or
guards an edge the other telemetry tests leave open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    TAG_VAR,
    Server,
    ServerFactory,
    connect,
    eventually,
    fake_model,
    fake_spec,
    launcher,
    poll,
    serve_command,
    tagged_processes,
)
from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as ipb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.core.catalog import ModelSpec, ModelType
from lemonade_grpc.core.options import EffectiveOptions, RequestedOptions
from lemonade_grpc.core.settings import PoolSettings, TelemetrySettings
from lemonade_grpc.pool.pool import Pool
from lemonade_grpc.store.pin_file import PinFile
from lemonade_grpc.telemetry import prometheus, service
from lemonade_grpc.telemetry.logs import JSONFormatter
from lemonade_grpc.telemetry.otel import Providers, exporters
from lemonade_grpc.telemetry.service import Telemetry
from otlp_receiver import FAST_EXPORT, attributes, grpc_receiver, named
from recorded import Recorded

WAIT_SECONDS = 15.0
UNREACHABLE_OTLP = "http://127.0.0.1:9"  # the discard port: connection refused


# ----------------------------------------------------------------- helpers


def run_serve(tmp_path: Path, env: dict[str, str], seconds: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `serve` with `env` added, expecting it to exit on its own (a start-up error)."""
    tag = os.urandom(8).hex()
    try:
        return subprocess.run(
            serve_command(tmp_path / "state"),
            env={**os.environ, **env, TAG_VAR: tag},
            capture_output=True,
            text=True,
            timeout=seconds,
        )
    finally:
        leaked = tagged_processes({tag})
        for process in leaked:
            process.kill()
        assert not leaked


def not_json(text: str) -> list[str]:
    bad = []
    for line in text.splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            bad.append(line)
    return bad


def prometheus_port(log: str) -> int:
    match = re.search(r"prometheus: http://127\.0\.0\.1:(\d+)/metrics", log)
    assert match, log
    return int(match.group(1))


# ------------------------------------------------- start-up: unusable values


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_EXPORTER_OTLP_TIMEOUT": "ten"},
        {"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd-please"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://[::1"},
        {"OTEL_METRIC_EXPORT_INTERVAL": "0"},
        {"OTEL_BSP_MAX_QUEUE_SIZE": "-1"},
        {"OTEL_METRICS_EXEMPLAR_FILTER": "bogus"},
    ],
    ids=["timeout", "compression", "endpoint", "export-interval", "bsp-queue", "exemplar-filter"],
)
def test_an_unusable_otel_variable_is_a_config_error_not_a_traceback(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Was: the SDK and exporters raise ValueError (or InvalidCompressionValueException) from their
    constructors inside `otel.providers`; only `TelemetryConfigError` is caught by `cli._serve`, so the
    server dies with a traceback and exit status 1 instead of `config error: ...` and 2."""
    done = run_serve(tmp_path, {"OTEL_EXPORTER_OTLP_ENDPOINT": UNREACHABLE_OTLP, **env})
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 2, done.stderr[-2000:]
    variable = next(iter(env))
    assert variable in done.stderr


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_TRACES_SAMPLER": "traceidration"},
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1%"},
    ],
    ids=["sampler", "sampler-arg"],
)
def test_an_unusable_sampler_is_a_config_error_not_a_silent_sample_everything(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Was: the server starts and traces every request. The SDK's `TracerProvider()` reads
    OTEL_TRACES_SAMPLER / _ARG itself and, on a value it does not know, logs one WARNING
    ("Couldn't recognize sampler", "Could not convert TRACES_SAMPLER_ARG to float. Using default
    rate 1.0") and samples everything: an operator who asked for 1 % gets 100 %. `otel.providers`
    validates the protocol but not these."""
    try:
        done = run_serve(tmp_path, {"OTEL_EXPORTER_OTLP_ENDPOINT": UNREACHABLE_OTLP, **env}, seconds=6)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{env}: the server started anyway, sampling every trace")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_a_prometheus_host_idna_cannot_encode_is_a_listen_error(tmp_path: Path) -> None:
    """Was: `socket.getaddrinfo("a..b")` raises UnicodeError (not OSError) inside prometheus_client's
    `start_http_server`; `_start_prometheus` catches only OSError, so the server dies with a traceback,
    exit status 1. `config._check_listen` lets any non-empty host through."""
    done = run_serve(tmp_path, {"LEMONADE_GRPC_PROMETHEUS_LISTEN": "metrics..example:9464"})
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 2
    assert "metrics..example:9464" in done.stderr


def test_a_prometheus_port_in_use_is_exit_2_with_its_address(tmp_path: Path) -> None:
    """Holds (guard): a port taken by someone else is a clear error, status 2, no traceback, and
    the server leaves nothing behind (the gRPC port is never opened)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_serve(tmp_path, {"LEMONADE_GRPC_PROMETHEUS_LISTEN": f"127.0.0.1:{port}"})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"127.0.0.1:{port}" in done.stderr


# -------------------------------------------------------------- shutdown


async def test_sigterm_with_an_unreachable_collector_exits_promptly(
    servers: ServerFactory, tiny_model: Path
) -> None:
    """Was (8-15 s here; 10 s per signal against a collector that accepts and never answers):
    `serve`'s finally runs `Telemetry.close` -> `Providers.shutdown`, which flushes the
    BatchSpanProcessor and the PeriodicExportingMetricReader one after the other, each export
    retrying with backoff up to OTEL_EXPORTER_OTLP_TIMEOUT (10 s). Nothing bounds the flush, so
    a dead collector adds its timeouts to every stop (systemd's TimeoutStopSec and the pod's
    terminationGracePeriodSeconds are 60 s, of which shutdown_grace 30 + stop_grace 5 are spent)."""
    server = servers.start(fake_model("m", tiny_model), env={"OTEL_EXPORTER_OTLP_ENDPOINT": UNREACHABLE_OTLP})
    async with connect(server.address) as client:
        await client.ready("m")  # spans and metrics to flush
    assert server.stop(signal.SIGTERM, seconds=40) == 0
    # The flush was given its bound and abandoned there, not the exporters' own 10 s of retries.
    assert "the exporters did not flush within 3 s" in server.log()


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


# ------------------------------------------------ the Prometheus endpoint


def _reset(port: int, data: bytes) -> None:
    """Connect, send `data`, and abort the connection (RST: SO_LINGER 0) without reading."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(data)
    time.sleep(0.05)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_a_scraper_that_resets_its_connection_writes_no_traceback_into_json_logs(
    servers: ServerFactory,
) -> None:
    """Was: each reset connection puts 14 plain-text lines ("Exception occurred during processing
    of request from ...", a traceback, ConnectionResetError) on the server's stderr, in the middle of
    the JSON log stream. prometheus_client's `start_http_server` serves with wsgiref/socketserver,
    whose `handle_error` prints straight to sys.stderr, bypassing logging; `_SilentHandler` silences
    only the access log. Anyone who can reach the (unauthenticated) endpoint, which the Kubernetes
    manifest binds to 0.0.0.0, can fill the log with unparseable lines at will."""
    server = servers.start(
        env={"LEMONADE_GRPC_LOG_FORMAT": "json", "LEMONADE_GRPC_PROMETHEUS_LISTEN": "127.0.0.1:0"}
    )
    port = prometheus_port(server.log())
    await asyncio.to_thread(_reset, port, b"GET /metr")
    await asyncio.to_thread(_reset, port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.5)
    server.stop()
    bad = not_json(server.log())
    assert not bad, "\n".join(bad[:20])


def _thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


async def test_idle_connections_to_the_prometheus_endpoint_cost_no_thread_and_block_no_scrape(
    servers: ServerFactory,
) -> None:
    """Was: every connection got a thread of its own (prometheus_client's ThreadingWSGIServer),
    blocked in `rfile.readline()` with no timeout, for as long as the peer kept the connection
    open: 300 silent connections were 300 threads (a container's pids limit, then no backend can
    be forked). The endpoint now runs on the event loop (aiohttp): an idle connection is a socket,
    closed after the keep-alive timeout, and a scrape is answered while they are open."""
    server = servers.start(env={"LEMONADE_GRPC_PROMETHEUS_LISTEN": "127.0.0.1:0"})
    port = prometheus_port(server.log())
    before = _thread_count(server.process.pid)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as reply,
        ):
            assert reply.status == 200
            assert "lemonade_models" in await reply.text()
        # Counted once a scrape accepted after the 300 was answered, so every one
        # of them was accepted by then (issue 18 finding 12: was after a 0.5 s sleep).
        threads = _thread_count(server.process.pid)
    finally:
        for sock in idle:
            sock.close()
    assert threads - before < 5, f"threads {before} -> {threads}"


# ------------------------------------------------------------- gauges


async def test_the_models_gauge_drops_to_zero_when_the_last_model_leaves(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Was: once the pool is empty `lemonade.models` (and `lemonade.models.pinned`) report no
    point at all, so `lemonade_models{type="llm",state="ready"}` vanishes from /metrics instead of
    reading 0 (`sum(lemonade_models{state="ready"})` is then empty, not 0, and alerts on "no ready
    model" never fire). `Instruments._models` emits the READY zero only "for every type seen" in
    the snapshot, and an empty pool has no type; the SDK drops unobserved points of an
    asynchronous gauge. test_telemetry.py's scrape looks right only because a FAILED model stays."""
    record = Recorded()
    pool = Pool(
        {"m": fake_spec("m", tiny_model)},
        PoolSettings(stop_grace_seconds=1.5),
        launcher(tmp_path / "logs"),
        observer=record.telemetry.observer,
    )
    record.telemetry.observe(pool)
    try:
        await pool.load("m", RequestedOptions(), pinned=True).outcome()
        assert ({"type": "llm", "state": "ready"}, 1) in record.points("lemonade.models")
        assert ({"type": "llm"}, 1) in record.points("lemonade.models.pinned")
        await pool.unload("m")
        models = record.points("lemonade.models")
        pinned = record.points("lemonade.models.pinned")
    finally:
        await pool.shutdown()
    assert ({"type": "llm", "state": "ready"}, 0) in models, models
    assert ({"type": "llm"}, 0) in pinned, pinned


# ------------------------------------------------------------- streams


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())


async def test_a_stream_cancelled_while_the_server_waits_on_a_slow_reader_is_counted_and_traced(
    servers: ServerFactory, tiny_model: Path
) -> None:
    """Was: the Complete span of a stream whose client stops reading and then cancels says
    rpc.grpc.status_code 0 (OK) and has no lemonade.tokens, and the server logs three ERROR
    "Failed to detach context" tracebacks and two "Setting attribute on ended span" warnings per
    such stream. (The metrics are right: counted `cancelled`, the gauge back to 0.)

    Root cause: when the cancellation reaches grpc.aio while it awaits `context.write()` (the
    client's flow-control window is full), grpc abandons the chain of async generators (the
    instrumentation's `_stream_interceptor` -> `errors.stream`'s wrapper -> `Complete` -> `_relay`)
    at a `yield`; each is finalized later by the event loop's asyncgen finalizer, in a new task with
    another `Context`: GeneratorExit instead of CancelledError, so `errors._mark_cancelled` never
    runs; the interceptor's span has ended before `_relay`'s finally calls `stream_ended`; every
    `with start_as_current_span` / `use_span` inside a generator (the interceptor's, and
    `RecordingStreams._call`'s) detaches its token in the wrong Context. test_telemetry.py's
    cancellation test only covers a cancel that lands inside the generator (a slow backend)."""
    async with grpc_receiver() as receiver:
        server = servers.start(
            '[telemetry]\nprometheus_listen = "127.0.0.1:0"\n'
            + fake_model("big", tiny_model, "--token-bytes", "65536"),
            env={**receiver.env(), "LEMONADE_GRPC_LOG_FORMAT": "json"},
        )
        port = prometheus_port(server.log())
        async with connect(server.address) as client:
            await client.ready("big")
            stream = client.inference.Complete(
                ipb.CompleteRequest(model="big", prompt="x", max_tokens=4000, ignore_eos=True)
            )
            await stream.read()
            await asyncio.sleep(1.5)  # the window fills; the server's handler waits in its write
            stream.cancel()

            async def ended() -> dict[Any, float] | None:
                samples = await scrape(port)
                done = value(samples, "lemonade_streams_total", model="big")
                return samples if done >= 1 else None

            samples = await poll(ended, WAIT_SECONDS, "the stream to be counted")

        async def span() -> Any:
            found = list(named(receiver.received.spans(), "/lemonade.v1.Inference/Complete"))
            return found[0] if found else None

        rpc = await poll(span, WAIT_SECONDS, "the Complete span")
        server.stop()  # while the collector still answers: a quick flush
    # Holds: the metrics.
    assert value(samples, "lemonade_streams_total", model="big", outcome="cancelled") == 1
    assert value(samples, "lemonade_streams_active", state="running") == 0
    # Fails: the span and the log.
    rpc_attributes = attributes(rpc.attributes)
    problems = [
        json.loads(line)["message"]
        for line in server.log().splitlines()
        if "Failed to detach context" in line or "ended span" in line
    ]
    assert (
        rpc_attributes.get("rpc.grpc.status_code"),
        "lemonade.tokens" in rpc_attributes,
        problems,
    ) == (grpc.StatusCode.CANCELLED.value[0], True, [])


# ------------------------------------------------------------ JSON logs


class _HangingTraces:
    """A collector's TraceService that never answers: exports stay in flight until it stops."""

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def Export(self, request: Any, context: Any) -> Any:
        self.called.set()
        await asyncio.sleep(60)


async def test_json_logs_stay_json_when_the_collector_goes_away_mid_export(
    servers: ServerFactory, tiny_model: Path
) -> None:
    """Was: when the collector stops (a rolling update, say) with an export in flight, the gRPC
    C core writes `I1129 ... chttp2_transport.cc:1403] ipv4:...: Got goaway [2] err=UNAVAILABLE ...`
    straight to file descriptor 2, between the JSON lines. The C core (absl logging) bypasses
    Python's logging, and nothing sets GRPC_VERBOSITY (or otherwise routes or silences the C
    core's log) when `--log-format json` is chosen; `logs.configure` only sees Python records.
    (Seen 2 times in 4 with the stock receiver stopping between exports; every time with an
    export in flight.)"""
    collector = grpc.aio.server()
    hanging = _HangingTraces()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(hanging, collector)  # type: ignore[no-untyped-call]
    collector_port = collector.add_insecure_port("127.0.0.1:0")
    await collector.start()
    try:
        server = servers.start(
            fake_model("a", tiny_model),
            env={
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{collector_port}",
                "OTEL_BSP_SCHEDULE_DELAY": "50",
                "OTEL_EXPORTER_OTLP_TIMEOUT": "5",
                "LEMONADE_GRPC_LOG_FORMAT": "json",
            },
        )
        async with connect(server.address) as client:
            await client.ready("a")  # spans: the BatchSpanProcessor exports them at once
        # An export in flight (issue 18 finding 12: was a 0.5 s sleep).
        await asyncio.wait_for(hanging.called.wait(), 10)
    finally:
        await collector.stop(None)  # cancels the export in flight: GOAWAY
    # The server has seen its export fail (the GOAWAY comes before): was a 0.5 s sleep.
    await eventually(lambda: "encountered while exporting traces" in server.log(), 10, "the failed export")
    server.stop(seconds=40)
    bad = not_json(server.log())
    assert not bad, "\n".join(bad[:20])


def failed_export(log: str) -> bool:
    return "Failed to export" in log or "encountered while exporting" in log


async def test_json_logs_stay_json_under_load_failures_and_a_dead_collector(
    servers: ServerFactory, tiny_model: Path
) -> None:
    """Holds (guard): crashes, failed starts, unknown models, a Prometheus scrape and exports
    failing after the collector left all log as JSON lines (the failures' tracebacks inside)."""
    config = (
        '[telemetry]\nprometheus_listen = "127.0.0.1:0"\n[pool]\nmax_loaded = { llm = 3 }\n'
        + fake_model("a", tiny_model, "--token-seconds", "0.001")
        + fake_model("b", tiny_model, "--crash-after-tokens", "3")
        + fake_model("broken", tiny_model, "--fail-start")
    )
    async with grpc_receiver() as receiver:
        server = servers.start(
            config,
            env={**receiver.env(), "LEMONADE_GRPC_LOG_FORMAT": "json", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"},
        )
        port = prometheus_port(server.log())

        async def one(model: str) -> None:
            async with connect(server.address) as client:
                request = ipb.CompleteRequest(model=model, prompt="hi", max_tokens=20)
                try:
                    async for _ in client.inference.Complete(request, timeout=10):
                        pass
                except grpc.aio.AioRpcError:
                    pass

        await asyncio.gather(*(one(m) for m in ["a"] * 6 + ["b", "broken"]))
        await scrape(port)
        await asyncio.sleep(0.5)  # between exports: no call in flight when the receiver stops
    await asyncio.gather(*(one(m) for m in ["a"] * 6 + ["b", "broken", "nope"]))
    await scrape(port)
    # Exports failing after the collector left (issue 18 finding 12: was a 1 s sleep).
    await eventually(lambda: failed_export(server.log()), 30, "an export to fail without the collector")
    server.stop(seconds=40)
    lines = server.log().splitlines()
    bad = [line for line in not_json(server.log()) if "chttp2_transport" not in line]  # the test above
    assert not bad, "\n".join(bad[:20])
    assert any('"event":"crash"' in line for line in lines)
    assert any('"reason":"BACKEND_START_FAILED"' in line for line in lines)


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


# ----------------------------------------------- metric labels from requests


async def test_a_client_cannot_put_arbitrary_model_names_into_metric_labels(
    servers: ServerFactory, tiny_model: Path
) -> None:
    """Was: `lemonade.streams` is labelled with `request.model` exactly as the client sent it,
    also when the name is unknown (MODEL_NOT_FOUND) or not a model name at all (INVALID_ARGUMENT,
    up to the 4 MB message limit). `Inference._relay` calls `stream_ended(model, ...)` in its
    finally for every error that `Pool.lease` raises, before the name was checked against the
    catalog, and `RecordingStreams.stream_ended` uses it as the label. Each distinct name is a
    time series kept for the life of the process, in every scrape and OTLP export: 20 requests with
    100 kB names make /metrics 2 MB (memory, scrape time and the TSDB's cardinality grow without
    bound), and once the SDK's cardinality limit is reached the streams of real models are folded
    into an `otel_metric_overflow` series and vanish from their own."""
    server = servers.start(
        '[telemetry]\nprometheus_listen = "127.0.0.1:0"\n' + fake_model("real", tiny_model)
    )
    port = prometheus_port(server.log())
    async with connect(server.address) as client:
        for index in range(20):
            name = f"{index}-" + "x" * 100_000  # not a model name: too long
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in client.inference.Complete(ipb.CompleteRequest(model=name, prompt="x")):
                    pass
        for index in range(20):
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in client.inference.Complete(
                    ipb.CompleteRequest(model=f"no-such-model-{index}", prompt="x")
                ):
                    pass
    samples = await scrape(port)
    labels = {
        dict(sample_labels).get("model", "")
        for (name, sample_labels) in samples
        if name.startswith("lemonade_")
    }
    assert all(label in ("", "real") for label in labels), (
        f"{len(labels)} model labels, {sum(map(len, labels)):,} characters in all"
    )


def test_a_json_log_line_survives_a_path_that_is_not_utf8(servers: ServerFactory, tmp_path: Path) -> None:
    """Was: a state directory whose name is not UTF-8 (a byte 0xff: Python decodes it to the lone
    surrogate U+DCFF) makes `JSONFormatter.format` raise (orjson: "str is not valid UTF-8:
    surrogates not allowed"); logging then prints "--- Logging error ---" and a 30-line traceback
    to stderr in place of the line, which is lost. The formatter should never fail: the plain one
    copes (stderr's backslashreplace), the JSON one needs the same (e.g. encode with
    "surrogateescape"/"backslashreplace" before orjson, or catch and degrade)."""
    server = servers.start(state_dir=tmp_path / "state-\udcff", env={"LEMONADE_GRPC_LOG_FORMAT": "json"})
    server.stop()
    bad = not_json(server.log())
    assert not bad, "\n".join(bad[:12])


async def test_a_second_ctrl_c_during_the_exporters_flush_exits_at_once_without_a_traceback(
    servers: ServerFactory,
) -> None:
    """Was: the second SIGINT prints a KeyboardInterrupt traceback (not JSON) and the process
    still takes ~6 s to exit. server.py promises "a second SIGINT/SIGTERM ... exits" at once.

    Root cause: `serve`'s finally runs `await asyncio.to_thread(telemetry.close)` after `_serve`
    has removed its signal handlers, so a second SIGINT gets Python's default handler:
    KeyboardInterrupt is raised in the event loop, and `asyncio.run`'s cleanup then waits for the
    default executor, where `close()` is still blocked in the exporters' retries."""
    server = servers.start(
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": UNREACHABLE_OTLP, "LEMONADE_GRPC_LOG_FORMAT": "json"}
    )
    server.process.send_signal(signal.SIGINT)
    await poll(
        lambda: asyncio.sleep(0, "flushing the exporters" in server.log() or None),
        WAIT_SECONDS,
        "the graceful stop to reach the telemetry flush",
    )
    server.process.send_signal(signal.SIGINT)
    status = await asyncio.to_thread(server.process.wait, 30)
    # Exited by the forced path, at once, saying so: not by the flush's end or a traceback.
    assert status == 128 + signal.SIGINT
    assert "SIGINT while flushing telemetry: exiting now" in server.log()
    assert not_json(server.log()) == []


def test_with_json_logs_a_fatal_start_up_error_is_a_json_line_too(tmp_path: Path) -> None:
    """Was (minor): with `LEMONADE_GRPC_LOG_FORMAT=json` the one line that says why the server
    would not start ("lemonade-grpc: config error: OTEL_EXPORTER_OTLP_PROTOCOL=...", "cannot listen
    on ... for Prometheus") is plain text: `cli._serve` `print`s it to stderr instead of logging it
    through the JSON handler `logs.configure` installed just before, so a log pipeline that parses
    JSON drops exactly the line that explains the crash loop."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_serve(
            tmp_path,
            {"LEMONADE_GRPC_LOG_FORMAT": "json", "LEMONADE_GRPC_PROMETHEUS_LISTEN": f"127.0.0.1:{port}"},
        )
    assert done.returncode == 2
    bad = not_json(done.stderr)
    assert not bad, bad


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


# ---------------------------------- issue 18, finding 4: scrapes and the pool's threads


class HeldCollector:
    """A Prometheus collector whose collections wait until the test releases them; counts those begun."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = 0
        self._count = threading.Lock()

    def describe(self) -> list[Metric]:
        return []  # registering it must not run a collection

    def collect(self) -> Iterator[Metric]:
        with self._count:
            self.entered += 1
        # Bounded only so that a failing test ends: the test releases it long before.
        self.release.wait(HELD_SECONDS)
        yield GaugeMetricFamily("held_collection", "a collection the test held", value=1)


HELD_SECONDS = 60.0
# More scrapes than asyncio's default executor has threads on any machine (min(32, CPUs + 4)).
SCRAPES = 40


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as reply:
        return reply.status, await reply.text()


@pytest.fixture
def held_collection(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldCollector]:
    """Every Prometheus endpoint started in this test collects `HeldCollector` too."""
    held = HeldCollector()
    real = service._prometheus_reader

    def reader() -> tuple[Any, CollectorRegistry]:
        found, registry = real()
        registry.register(held)
        return found, registry

    monkeypatch.setattr(service, "_prometheus_reader", reader)
    try:
        yield held
    finally:
        held.release.set()


async def test_finding_4_a_pin_and_a_load_complete_while_many_scrapes_are_held_in_collection(
    tmp_path: Path, tiny_model: Path, held_collection: HeldCollector, caplog: pytest.LogCaptureFixture
) -> None:
    """Was (issue 18, finding 4): the collection ran in asyncio's default thread pool, which also
    writes pins and backend records, reads GGUF headers and /proc for loads: with scrapes slower
    than Pins come, the pool's work queued behind them (Pin p50 1.5 ms -> 555 ms with 200 scraping
    connections). With 40 scrapes held inside the collection, a Load and a Pin never completed until
    the collections were let go. Now collections have a thread of their own and are single-flight:
    one collection is under way however many scrapes wait, and the pool's work goes on beside it."""
    caplog.set_level(logging.INFO, logger="lemonade_grpc")
    telemetry = await Telemetry.start(TelemetrySettings(prometheus_listen="127.0.0.1:0"), env={})
    pool = Pool(
        {"m": fake_spec("m", tiny_model)},
        PoolSettings(stop_grace_seconds=1.5),
        launcher(tmp_path / "logs"),
        pin_file=PinFile(tmp_path / "pins.json"),
        observer=telemetry.observer,
    )
    telemetry.observe(pool)
    url = f"http://127.0.0.1:{prometheus_port(caplog.text)}/metrics"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=SCRAPES)) as session:
        scrapes = [asyncio.create_task(_get(session, url)) for _ in range(SCRAPES)]
        try:
            await eventually(lambda: held_collection.entered >= 1, WAIT_SECONDS, "a collection to begin")
            try:
                # Bounded: with the bug these wait on the held collections, which the test holds longer.
                await asyncio.wait_for(pool.load("m", RequestedOptions()).outcome(), WAIT_SECONDS)
                view = await asyncio.wait_for(pool.pin("m", True), WAIT_SECONDS)
            except TimeoutError:
                pytest.fail(f"the pool's work queued behind {held_collection.entered} held collections")
            assert view.pinned
            assert "m" in json.loads((tmp_path / "pins.json").read_text())["pinned"]
            assert not any(scrape.done() for scrape in scrapes)  # all still held
            assert telemetry.prometheus is not None
            collections = telemetry.prometheus.collections
            await eventually(lambda: collections.waiting == SCRAPES, WAIT_SECONDS, "every scrape to wait")
            assert held_collection.entered == collections.started == 1
        finally:
            held_collection.release.set()
            replies = await asyncio.gather(*scrapes)
            await pool.shutdown()
            await telemetry.close()
    assert all(status == 200 and "held_collection 1.0" in text for status, text in replies)
    # The one held, then one for every scrape that came while it ran.
    assert held_collection.entered == collections.started <= 2


def _exchange(port: int, data: bytes) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECONDS) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


async def test_the_metrics_endpoint_answers_pipelined_requests_in_order_and_refuses_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guard for the endpoint that replaced aiohttp's server (issue 18, finding 4): requests
    pipelined on one connection are answered in order, HEAD without a body; another path is 404,
    another method 405; an oversized or unparseable request is answered and the connection closed."""
    caplog.set_level(logging.INFO, logger="lemonade_grpc")
    telemetry = await Telemetry.start(TelemetrySettings(prometheus_listen="127.0.0.1:0"), env={})
    port = prometheus_port(caplog.text)
    try:
        pipelined = await asyncio.to_thread(
            _exchange,
            port,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            b"HEAD /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        statuses = re.findall(rb"^HTTP/1\.1 (\d+)", pipelined, re.MULTILINE)
        assert statuses == [b"200", b"200", b"404", b"405", b"200"], pipelined[:2000]
        assert pipelined.count(b"# TYPE process_resident_memory_bytes gauge") == 2  # not in HEAD's
        huge = await asyncio.to_thread(
            _exchange, port, b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * (64 << 10) + b"\r\n\r\n"
        )
        assert huge.startswith(b"HTTP/1.1 431 "), huge[:200]
        garbage = await asyncio.to_thread(_exchange, port, b"\x16\x03\x01 not http\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 "), garbage[:200]
    finally:
        await telemetry.close()


async def test_the_metrics_endpoint_closes_silent_connections_and_bounds_how_many_it_holds(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guard: a connection that never completes a request is closed when its keep-alive time has
    passed, whatever bytes it trickles; past `MAX_CONNECTIONS` the connection idle longest is closed
    (each holds a descriptor the gRPC streams and backends need), and a scraper is still served."""
    monkeypatch.setattr(prometheus, "MAX_CONNECTIONS", 4)
    caplog.set_level(logging.INFO, logger="lemonade_grpc")
    telemetry = await Telemetry.start(TelemetrySettings(prometheus_listen="127.0.0.1:0"), env={})
    port = prometheus_port(caplog.text)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    try:
        for sock in idle:
            sock.setblocking(False)

        def closed(sock: socket.socket) -> bool:
            try:
                return sock.recv(1) == b""
            except BlockingIOError:
                return False

        await eventually(lambda: sum(map(closed, idle)) >= 6, WAIT_SECONDS, "the oldest idle to be closed")
        async with aiohttp.ClientSession() as session:
            status, text = await _get(session, f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert "process_resident_memory_bytes" in text
        monkeypatch.setattr(prometheus, "KEEPALIVE_SECONDS", 0.1)
        unfinished = await asyncio.to_thread(_exchange, port, b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        assert unfinished == b""  # closed, never answered
    finally:
        for sock in idle:
            sock.close()
        await telemetry.close()


async def test_finding_4_the_serving_process_holds_no_aiohttp_with_a_prometheus_endpoint(
    servers: ServerFactory,
) -> None:
    """Was (issue 18, finding 4): the endpoint ran on aiohttp's server, about 10 MiB of the serving
    process's memory (9.3 MiB of it the import alone) for one route. Now it is served with httptools,
    which the backend client already uses: no aiohttp module (its C parser) is mapped at all."""
    server = servers.start(env={"LEMONADE_GRPC_PROMETHEUS_LISTEN": "127.0.0.1:0"})
    async with aiohttp.ClientSession() as session:
        status, _ = await _get(session, f"http://127.0.0.1:{prometheus_port(server.log())}/metrics")
    assert status == 200
    mapped = await asyncio.to_thread(Path(f"/proc/{server.process.pid}/maps").read_text)
    assert "/aiohttp/" not in mapped, [line for line in mapped.splitlines() if "/aiohttp/" in line][:3]


# ------------------------- issue 18, finding 13: OTEL_TRACES_EXPORTER, OTEL_METRICS_EXPORTER


def json_lines(text: str) -> list[dict[str, Any]]:
    """The lines of `text` that are JSON objects (the console exporters' output among log lines)."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a log line written into the middle of a long one; the next export is whole
    return found


def printed_span(server: Server, name: str) -> dict[str, Any] | None:
    return next((o for o in json_lines(server.log()) if o.get("name") == name and "context" in o), None)


def printed_metric(server: Server, name: str) -> dict[str, Any] | None:
    for data in json_lines(server.log()):
        for resource in data.get("resource_metrics", []):
            for scope in resource["scope_metrics"]:
                for metric in scope["metrics"]:
                    if metric["name"] == name:
                        return cast(dict[str, Any], metric)
    return None


STATUS_SPAN = "/lemonade.v1.ModelControl/Status"


async def printed(find: Callable[[], dict[str, Any] | None], what: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        return find()

    return await poll(check, WAIT_SECONDS, what)


@pytest.mark.parametrize("variable", ["OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER"])
async def test_finding_13_console_prints_spans_or_metrics_on_standard_output(
    servers: ServerFactory, variable: str
) -> None:
    """Was (issue 18, finding 13): `console`, a known value of both variables in the OpenTelemetry
    spec (what one sets to see telemetry without a collector), was ignored in silence: the server
    ran and printed nothing. Now each span, each metric export, is one JSON line on stdout."""
    server = servers.start(env={variable: "console", **FAST_EXPORT})
    async with connect(server.address) as client:
        await client.control.Status(pb.StatusRequest())
    if variable == "OTEL_TRACES_EXPORTER":
        span = await printed(lambda: printed_span(server, STATUS_SPAN), "the printed span")
        assert span["attributes"]["rpc.method"] == "Status"
        assert printed_metric(server, "lemonade.models") is None  # metrics were not asked for
    else:
        metric = await printed(lambda: printed_metric(server, "lemonade.models"), "the printed metrics")
        assert {"type": "llm", "state": "ready"} in [p["attributes"] for p in metric["data"]["data_points"]]
        assert printed_span(server, STATUS_SPAN) is None
    assert server.stop() == 0


async def test_finding_13_a_list_of_exporters_exports_to_each(servers: ServerFactory) -> None:
    """Was: `console,otlp` exported by OTLP only. A comma-separated list (case and spaces as the
    spec allows) gets each exporter: the span is printed and reaches the collector."""
    async with grpc_receiver() as receiver:
        server = servers.start(env={**receiver.env(), "OTEL_TRACES_EXPORTER": " Console , OTLP "})
        async with connect(server.address) as client:
            await client.control.Status(pb.StatusRequest())
        await printed(lambda: printed_span(server, STATUS_SPAN), "the printed span")

        async def collected() -> list[Span] | None:
            return list(named(receiver.received.spans(), STATUS_SPAN)) or None

        await poll(collected, WAIT_SECONDS, "the span at the collector")


async def test_finding_13_prometheus_in_otel_metrics_exporter_serves_the_endpoint(
    servers: ServerFactory,
) -> None:
    """Was: `OTEL_METRICS_EXPORTER=prometheus` (a known value) was ignored. It serves the endpoint
    on `OTEL_EXPORTER_PROMETHEUS_HOST`:`…_PORT`, as `[telemetry] prometheus_listen` would."""
    server = servers.start(
        env={
            "OTEL_METRICS_EXPORTER": "prometheus",
            "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
            "OTEL_EXPORTER_PROMETHEUS_PORT": "0",
        }
    )
    samples = await scrape(prometheus_port(server.log()))
    assert value(samples, "lemonade_models", type="llm", state="ready") == 0


@pytest.mark.parametrize(
    ("env", "named_value"),
    [
        ({"OTEL_TRACES_EXPORTER": "consle"}, "consle"),
        ({"OTEL_METRICS_EXPORTER": "otlp,statsd"}, "statsd"),
        ({"OTEL_TRACES_EXPORTER": "prometheus"}, "prometheus"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "zipkin"),
        ({"OTEL_METRICS_EXPORTER": "logging"}, "logging"),
        ({"OTEL_METRICS_EXPORTER": "none,console"}, "none,console"),
        ({"OTEL_METRICS_EXPORTER": "prometheus", "OTEL_EXPORTER_PROMETHEUS_PORT": "http"}, "http"),
    ],
    ids=["typo", "unknown-in-list", "metrics-only-value", "zipkin", "deprecated", "none-and-more", "port"],
)
def test_finding_13_an_exporter_we_cannot_serve_stops_serve_with_a_config_error(
    tmp_path: Path, env: dict[str, str], named_value: str
) -> None:
    """Was: any value of OTEL_TRACES_EXPORTER / OTEL_METRICS_EXPORTER other than the ones we act on
    was ignored: the server ran, exporting nothing. Now it refuses to start, exit status 2, with a
    config error naming the variable and the value, as the other OTEL_* mistakes do."""
    try:
        done = run_serve(tmp_path, env, seconds=WAIT_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{env}: the server started anyway")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    variable = next(name for name, value in env.items() if named_value in value)
    assert re.search(rf"config error: {variable}='[^']*{re.escape(named_value)}", done.stderr), done.stderr


@pytest.mark.parametrize(
    ("env", "traces", "metrics"),
    [
        ({}, set(), set()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, {"otlp"}, {"otlp"}),
        ({"OTEL_TRACES_EXPORTER": "", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, {"otlp"}, {"otlp"}),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, {"otlp"}, set()),  # the exporter's default endpoint
        ({"OTEL_TRACES_EXPORTER": "CONSOLE", "OTEL_METRICS_EXPORTER": "console,"}, {"console"}, {"console"}),
        ({"OTEL_METRICS_EXPORTER": "otlp, prometheus,otlp"}, set(), {"otlp", "prometheus"}),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, set(), {"otlp"}),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "TRUE"}, set(), set()),
    ],
)
def test_finding_13_the_exporter_variables_mean_what_the_spec_says(
    env: dict[str, str], traces: set[str], metrics: set[str]
) -> None:
    assert exporters(env, "TRACES") == traces
    assert exporters(env, "METRICS") == metrics


def test_with_telemetry_off_the_sdk_is_not_imported() -> None:
    """Guard (a slip made while fixing finding 13): building the providers for an environment that
    asks for nothing imported the SDK's metric readers, 0.9 MiB of a server with telemetry off."""
    code = (
        "import sys; from lemonade_grpc.telemetry import otel; otel.providers({});"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


async def test_a_refused_request_still_being_sent_gets_its_answer_not_a_reset(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Seen once under load (issue 18 finding 12): the 64 KiB header of the test above got
    ECONNRESET instead of its 431, the endpoint having closed with the client's bytes unread (a
    socket closed so is reset). The close now lingers: the answer first, the rest drained. A guard:
    this 4 MiB header did not bring the reset back here on the old code either."""
    caplog.set_level(logging.INFO, logger="lemonade_grpc")
    telemetry = await Telemetry.start(TelemetrySettings(prometheus_listen="127.0.0.1:0"), env={})
    port = prometheus_port(caplog.text)

    def oversized_then_more() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECONDS) as sock:
            # More than the endpoint reads at once: bytes are still unread when it refuses them.
            with contextlib.suppress(OSError):
                sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * (4 << 20) + b"\r\n\r\n")
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received

    try:
        answer = await asyncio.to_thread(oversized_then_more)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    finally:
        await telemetry.close()
