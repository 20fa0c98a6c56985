"""Log lines: JSON lines stay JSON whatever happens; grpc.aio's client-gone ERROR is a DEBUG line.

The JSON tests each showed a defect when written (see their docstrings).
The filter's (soak, issue 13): grpc.aio logs an ERROR for a call whose
client left as the answer went out.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from conftest import ServerFactory, connect, eventually, fake_model
from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as ipb
from lemonade_grpc.telemetry.logs import ClientGoneFilter
from otlp_receiver import grpc_receiver
from serve_telemetry import not_json, prometheus_port, run_serve, scrape

MESSAGE = "ExecuteBatchError raised in core by servicer method [/lemonade.v1.Inference/Chat]"


def log_to(logger: logging.Logger, message: str) -> None:
    try:
        raise RuntimeError('Failed "execute_batch"')
    except RuntimeError:
        logger.exception(message)


@pytest.fixture
def cygrpc() -> Iterator[logging.Logger]:
    logger = logging.getLogger("grpc._cython.cygrpc.test")
    logger.addFilter(ClientGoneFilter())
    yield logger
    logger.filters.clear()


def test_the_client_gone_error_is_not_logged_above_debug(
    cygrpc: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    log_to(cygrpc, MESSAGE)
    assert not caplog.records


def test_at_debug_it_is_one_line_without_a_traceback(
    cygrpc: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    log_to(cygrpc, MESSAGE)
    [record] = caplog.records
    assert record.levelno == logging.DEBUG
    assert record.exc_info is None
    assert record.getMessage().startswith(MESSAGE)
    assert "the client left" in record.getMessage()


def test_other_errors_of_grpc_are_left_alone(
    cygrpc: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    log_to(cygrpc, "Unexpected [RuntimeError] raised by servicer method [/lemonade.v1.Inference/Chat]")
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None


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
