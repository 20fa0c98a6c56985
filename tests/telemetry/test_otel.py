"""OpenTelemetry from the standard `OTEL_*` variables: what they mean, what a typo does, the exit.

Most tests showed a defect when they were written (see the docstrings);
issue 18 finding 13 is the exporter variables.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from conftest import ServerFactory, connect, fake_model, poll
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.telemetry.otel import TelemetryConfigError, exporters, otlp_protocol, otlp_wanted
from lemonade_grpc.testing import ServerProcess as Server
from otlp_receiver import FAST_EXPORT, grpc_receiver, named
from serve_telemetry import (
    UNREACHABLE_OTLP,
    WAIT_SECONDS,
    not_json,
    prometheus_port,
    run_serve,
    scrape,
    value,
)


@pytest.mark.parametrize(
    ("env", "traces", "metrics"),
    [
        ({}, False, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, True, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317/v1/traces"}, True, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_METRICS_EXPORTER": "none"}, True, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}, False, False),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "console,otlp"},
            True,
            True,
        ),
    ],
)
def test_the_standard_variables_say_what_is_exported(
    env: dict[str, str], traces: bool, metrics: bool
) -> None:
    assert (otlp_wanted(env, "TRACES"), otlp_wanted(env, "METRICS")) == (traces, metrics)


def test_an_unknown_protocol_is_refused_by_name() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}
    assert otlp_protocol(env, "METRICS") == "grpc"
    with pytest.raises(TelemetryConfigError, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='http/json'"):
        otlp_protocol(env, "TRACES")


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
