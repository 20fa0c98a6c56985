"""Telemetry end to end: traces and metrics to a real OTLP receiver, the Prometheus scrape, JSON logs.

Every test runs the real server (a subprocess) on the bundled tiny model
served by the real llama-server, and reads what the server exported.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerFactory, connect, fake_model, poll
from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as ipb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.testing import ServerProcess as Server
from otlp_receiver import Receiver, attributes, children, grpc_receiver, http_receiver, named

WAIT_SECONDS = 20.0


def traceparent() -> tuple[str, str, tuple[tuple[str, str]]]:
    """A fresh W3C trace context as a client would send it: (trace id, parent span id, metadata)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, (("traceparent", f"00-{trace_id}-{span_id}-01"),)


def one(spans: list[Span], name: str, trace_id: str) -> Span | None:
    found = [s for s in named(spans, name) if s.trace_id.hex() == trace_id]
    return found[0] if found else None


async def arrived(receiver: Receiver, *wanted: tuple[str, str]) -> list[Span]:
    """The span named so in each (name, trace id) of `wanted`, once all have reached the receiver."""

    async def found() -> list[Span] | None:
        spans = receiver.received.spans()
        matches = [one(spans, name, trace_id) for name, trace_id in wanted]
        return [m for m in matches if m is not None] if all(matches) else None

    return await poll(found, WAIT_SECONDS, f"the spans {wanted} at the receiver")


def log_lines(server: Server) -> list[dict[str, Any]]:
    """The server's log, each line parsed as JSON (fails on a line that is not)."""
    lines = []
    for line in server.log().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}")
    return lines


async def complete(server: Server, metadata: tuple[tuple[str, str], ...] = ()) -> int:
    """Stream a short completion from the tiny model; return the tokens it carried."""
    async with connect(server.address) as client:
        request = ipb.CompleteRequest(model="tiny", prompt="Hello", max_tokens=8, ignore_eos=True)
        replies = [r async for r in client.inference.Complete(request, metadata=metadata)]
    tokens = sum(r.token_count for r in replies)
    assert tokens == replies[-1].usage.completion_tokens == 8
    return tokens


@pytest.mark.parametrize("start_receiver", [grpc_receiver, http_receiver], ids=["grpc", "http"])
async def test_a_load_and_a_completion_make_one_span_tree_each(
    servers: ServerFactory, start_receiver: Any
) -> None:
    receiver: Receiver
    async with start_receiver() as receiver:
        server = servers.start(env={**receiver.env(), "LEMONADE_GRPC_LOG_FORMAT": "json"})
        load_trace, load_parent, load_metadata = traceparent()
        complete_trace, _, complete_metadata = traceparent()
        async with connect(server.address) as client:
            responses = [
                r async for r in client.control.Load(pb.LoadRequest(model="tiny"), metadata=load_metadata)
            ]
            pid = (await client.pids())["tiny"]
        assert responses[-1].phase == pb.LOAD_PHASE_READY
        tokens = await complete(server, complete_metadata)

        load_rpc, complete_rpc = await arrived(
            receiver,
            ("/lemonade.v1.ModelControl/Load", load_trace),
            ("/lemonade.v1.Inference/Complete", complete_trace),
        )
        # Let the children (ended before their RPC span) arrive too: they are in the same or an earlier batch.
        spans = receiver.received.spans()

    # The Load call continues the client's trace.
    assert load_rpc.kind == Span.SPAN_KIND_SERVER
    assert load_rpc.parent_span_id.hex() == load_parent
    # RPC → the load → its phases, in order.
    (load,) = children(spans, load_rpc)
    assert load.name == "load tiny"
    load_attributes = attributes(load.attributes)
    assert load_attributes["lemonade.model"] == "tiny"
    assert load_attributes["lemonade.origin"] == "request"
    assert load_attributes["lemonade.outcome"] == "loaded"
    assert load_attributes["lemonade.pid"] == pid
    phases = children(spans, load)
    assert [p.name for p in phases] == ["queued", "starting", "loading"]
    assert attributes(phases[-1].attributes)["lemonade.pid"] == pid
    for earlier, later in itertools.pairwise(phases):
        assert earlier.end_time_unix_nano <= later.start_time_unix_nano + 1_000_000
    assert load_rpc.start_time_unix_nano <= load.start_time_unix_nano <= load.end_time_unix_nano
    assert load.end_time_unix_nano <= load_rpc.end_time_unix_nano
    # RPC → the backend's HTTP call; the stream's summary on the RPC span.
    (call,) = children(spans, complete_rpc)
    assert call.name == "POST /v1/completions"
    assert call.kind == Span.SPAN_KIND_CLIENT
    assert attributes(call.attributes)["lemonade.pid"] == pid
    assert attributes(complete_rpc.attributes)["lemonade.tokens"] == tokens
    assert attributes(complete_rpc.attributes)["rpc.grpc.status_code"] == 0
    assert {r["service.name"] for r in receiver.received.resources()} == {"lemonade-grpc"}
    # Health probes and reflection make no spans.
    assert not [s for s in spans if "grpc.health" in s.name or "reflection" in s.name]
    # The log: JSON lines, the load's line carrying its trace id.
    lines = log_lines(server)
    (loaded,) = [line for line in lines if line.get("event") == "load"]
    assert loaded["model"] == "tiny"
    assert loaded["outcome"] == "loaded"
    assert loaded["pid"] == pid
    assert loaded["trace_id"] == load_trace
    assert loaded["level"] == "INFO"


def _points(metric: Metric) -> list[Any]:
    kind = metric.WhichOneof("data")
    assert kind is not None
    return list(getattr(metric, kind).data_points)


def _sum_where(metric: Metric, **labels: str) -> float:
    return sum(
        float(p.as_int or p.as_double)
        for p in _points(metric)
        if all(attributes(p.attributes).get(k) == v for k, v in labels.items())
    )


async def test_metrics_reach_the_otlp_receiver(servers: ServerFactory) -> None:
    async with grpc_receiver() as receiver:
        server = servers.start(env=receiver.env())
        async with connect(server.address) as client:
            await client.ready("tiny")
            tokens = await complete(server)
            tokens += await complete(server)
            await client.control.Unload(pb.UnloadRequest(model="tiny"))

        async def settled() -> dict[str, Metric] | None:
            metrics = receiver.received.latest_metrics()
            unloads = metrics.get("lemonade.unloads")
            return metrics if unloads is not None and _sum_where(unloads, reason="requested") == 1 else None

        metrics = await poll(settled, WAIT_SECONDS, "the unload to be counted at the receiver")
    assert _sum_where(metrics["lemonade.loads"], model="tiny", outcome="loaded") == 1
    assert _sum_where(metrics["lemonade.tokens.streamed"], model="tiny") == tokens
    assert _sum_where(metrics["lemonade.streams"], model="tiny", outcome="ok") == 2
    (ttft,) = _points(metrics["lemonade.time_to_first_token"])
    assert ttft.count == 2
    assert 0 < ttft.sum < WAIT_SECONDS
    phases = {
        attributes(p.attributes)["phase"]: p.count for p in _points(metrics["lemonade.load.phase.duration"])
    }
    assert phases == {"queued": 1, "starting": 1, "loading": 1}
    assert metrics["lemonade.load.phase.duration"].unit == "s"


def _prometheus_port(server: Server) -> int:
    match = re.search(r"prometheus: http://127\.0\.0\.1:(\d+)/metrics", server.log())
    assert match, server.log()
    return int(match.group(1))


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and parse the text format: {(sample name, sorted labels): value}."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The value of the one sample `name` whose labels include `labels`."""
    found = [
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and labels.items() <= dict(sample_labels).items()
    ]
    assert len(found) == 1, (name, labels, [k for k in samples if k[0] == name])
    return found[0]


async def test_the_prometheus_endpoint_shows_the_pool(servers: ServerFactory, tiny_model: Path) -> None:
    config = '[telemetry]\nprometheus_listen = "127.0.0.1:0"\n[pool]\nmax_loaded = { llm = 2 }\n'
    config += fake_model("fake", tiny_model, "--crash-after-tokens", "2")
    config += f'[models.tiny]\nrecipe = "llamacpp"\npath = "{tiny_model}"\nctx_size = 2048\n'
    server = servers.start(config)
    port = _prometheus_port(server)
    async with connect(server.address) as client:
        await client.ready("tiny", pinned=True)
        tokens = await complete(server)
        loaded = await scrape(port)
        # A crash: counted with its reason, and a line in the log.
        await client.ready("fake")
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in client.inference.Complete(
                ipb.CompleteRequest(model="fake", prompt="x", max_tokens=8)
            ):
                pass
        await client.control.Unload(pb.UnloadRequest(model="tiny"))

        async def after() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
            samples = await scrape(port)
            unloads = [
                value
                for (name, labels), value in samples.items()
                if name == "lemonade_unloads_total" and ("reason", "requested") in labels
            ]
            return samples if unloads == [1.0] else None

        unloaded = await poll(after, WAIT_SECONDS, "the unload on /metrics")
    assert sample(loaded, "lemonade_loads_total", model="tiny", outcome="loaded") == 1
    assert sample(loaded, "lemonade_models", type="llm", state="ready") == 1
    assert sample(loaded, "lemonade_models_pinned", type="llm") == 1
    assert sample(loaded, "lemonade_tokens_streamed_total", model="tiny") == tokens
    assert sample(loaded, "lemonade_time_to_first_token_seconds_count", model="tiny") == 1
    assert sample(loaded, "lemonade_load_phase_duration_seconds_count", model="tiny", phase="loading") == 1
    assert sample(loaded, "lemonade_backend_memory_rss_bytes", model="tiny") > 1 << 20
    assert sample(loaded, "lemonade_load_queue_length") == 0
    assert sample(loaded, "lemonade_streams_active", state="running") == 0
    assert sample(loaded, "process_resident_memory_bytes") > 1 << 20
    assert sample(unloaded, "lemonade_unloads_total", model="fake", reason="crashed") == 1
    assert sample(unloaded, "lemonade_streams_total", model="fake", outcome="BACKEND_CRASHED") == 1
    assert sample(unloaded, "lemonade_models", type="llm", state="ready") == 0
    assert re.search(r"WARNING lemonade_grpc\.pool: fake: backend pid \d+ crashed", server.log())


async def test_a_stream_in_flight_shows_on_the_gauge(servers: ServerFactory, tiny_model: Path) -> None:
    config = '[telemetry]\nprometheus_listen = "127.0.0.1:0"\n' + fake_model(
        "slow", tiny_model, "--token-seconds", "0.05"
    )
    server = servers.start(config)
    port = _prometheus_port(server)
    async with connect(server.address) as client:
        await client.ready("slow")
        stream = client.inference.Complete(ipb.CompleteRequest(model="slow", prompt="x", max_tokens=200))
        await stream.read()  # the first message: the stream is running

        async def running() -> float | None:
            value = sample(await scrape(port), "lemonade_streams_active", state="running")
            return value if value == 1 else None

        assert await poll(running, WAIT_SECONDS, "the running stream on the gauge") == 1
        stream.cancel()


async def test_a_stream_the_client_gives_up_on_says_so_on_its_span(
    servers: ServerFactory, tiny_model: Path
) -> None:
    async with grpc_receiver() as receiver:
        server = servers.start(fake_model("slow", tiny_model, "--token-seconds", "0.05"), env=receiver.env())
        cancelled_trace, _, cancelled_metadata = traceparent()
        expired_trace, _, expired_metadata = traceparent()
        request = ipb.CompleteRequest(model="slow", prompt="x", max_tokens=500)
        async with connect(server.address) as client:
            await client.ready("slow")
            stream = client.inference.Complete(request, metadata=cancelled_metadata)
            await stream.read()
            stream.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                async for _ in client.inference.Complete(request, metadata=expired_metadata, timeout=0.5):
                    pass
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        gone, late = await arrived(
            receiver,
            ("/lemonade.v1.Inference/Complete", cancelled_trace),
            ("/lemonade.v1.Inference/Complete", expired_trace),
        )
    assert attributes(gone.attributes)["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert attributes(late.attributes)["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    for span in (gone, late):
        assert attributes(span.attributes)["lemonade.tokens"] >= 1
    # The client's choice is not a server error; a deadline is one (the semantic conventions' rule).
    assert gone.status.code != gone.status.STATUS_CODE_ERROR
    assert late.status.code == late.status.STATUS_CODE_ERROR
