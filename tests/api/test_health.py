"""`grpc.health.v1.Health`, bounded: its Watch streams and their requests (issue 18 finding 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ServerFactory, fake_model, next_message, poll
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2_grpc
from rpc_errors import error_info


async def test_finding_3_health_watch_streams_and_their_requests_are_bounded(
    servers: ServerFactory, tiny_model: Path
) -> None:
    # Issue 18 finding 3: Health needs no token, its Watch streams were not counted, and each held its
    # request: 300 streams naming a 3 MiB service took the server to 3.7 GB.
    server = servers.start("[limits]\nmax_health_watch_streams = 3\n" + fake_model("m", tiny_model))
    async with grpc.aio.insecure_channel(server.address) as channel:
        probe: Any = health_pb2_grpc.HealthStub(channel)  # untyped: grpcio-health-checking has no stubs

        def watch(service: str = "") -> Any:
            return probe.Watch(health_pb2.HealthCheckRequest(service=service))

        async def refusal(call: Any) -> str:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.read()
            return f"{refused.value.code().name} {error_info(refused.value).reason}"

        huge = await refusal(watch("x" * (3 << 20)))
        assert huge == "INVALID_ARGUMENT INVALID_REQUEST"
        watching = [watch() for _ in range(3)]
        for call in watching:
            assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVING
        assert await refusal(watch()) == "RESOURCE_EXHAUSTED OVERLOADED"
        # Counted apart: the pool's Watch is not crowded out by anonymous health watchers.
        events = model_control_pb2_grpc.ModelControlStub(channel).Watch(pb.WatchRequest())
        assert (await next_message(events)).WhichOneof("event") == "snapshot"
        events.cancel()
        # A stream that ends gives its place back.
        watching.pop().cancel()

        async def admitted() -> Any:
            call = watch()
            try:
                return call if (await call.read()).status == health_pb2.HealthCheckResponse.SERVING else None
            except grpc.aio.AioRpcError:
                return None

        watching.append(await poll(admitted, 10, "a health Watch to be admitted again"))
        checked = await probe.Check(health_pb2.HealthCheckRequest(service="lemonade.v1.ModelControl"))
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
        for call in watching:
            call.cancel()
