"""The Prometheus endpoint: a hostile scraper, held collections, pipelined requests, bad addresses.

Each test showed a defect when it was written (see the docstrings), or
guards an edge the other telemetry tests leave open (issue 18 finding 4).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from conftest import ServerFactory, eventually, fake_spec, launcher
from lemonade_grpc.core.options import RequestedOptions
from lemonade_grpc.core.settings import PoolSettings, TelemetrySettings
from lemonade_grpc.pool.pool import Pool
from lemonade_grpc.store.pin_file import PinFile
from lemonade_grpc.telemetry import prometheus, service
from lemonade_grpc.telemetry.service import Telemetry
from serve_telemetry import WAIT_SECONDS, not_json, prometheus_port, run_serve


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
