"""Telemetry of inference streams: a stream cancelled while the server waits on a slow reader."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc

from conftest import ServerFactory, connect, fake_model, poll
from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as ipb
from otlp_receiver import attributes, grpc_receiver, named
from serve_telemetry import WAIT_SECONDS, prometheus_port, scrape, value


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
    `RecordingStreams._call`'s) detaches its token in the wrong Context. telemetry/test_service.py's
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
