"""The stream interval (`[limits] stream_interval_ms`): the first delta at once, then a message per interval.

Issue 13: one gRPC message (and one backend read) per token was most of the
proxy's cost. `Pacer` decides when the next read of the backend's stream may
happen; the relay sends what that read brought as one message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

import grpc
import pytest

from conftest import (
    ServerFactory,
    connect,
    eventually,
    fake_model,
    fake_spec,
    launch_backend,
    next_message,
    read_all,
    release_tokens,
)
from lemonade_grpc._gen.lemonade.v1 import inference_pb2
from lemonade_grpc._gen.lemonade.v1.inference_pb2_grpc import InferenceStub, add_InferenceServicer_to_server
from lemonade_grpc.api.inference import Inference
from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.backends.chunks import Chunk
from lemonade_grpc.backends.pacing import Pacer, PacingClock
from lemonade_grpc.core.settings import Limits
from lemonade_grpc.pool.pool import Pool

if TYPE_CHECKING:
    from lemonade_grpc._gen.lemonade.v1.inference_pb2_grpc import InferenceAsyncStub

INTERVAL = 0.005


def text(*pieces: str) -> list[Chunk]:
    return [Chunk(piece) for piece in pieces]


def test_the_first_text_is_never_held() -> None:
    pacer = Pacer(INTERVAL, None)
    assert pacer.hold_until(text("a"), 100.0) == 0.0


def test_a_batch_without_text_neither_holds_nor_counts_as_the_first() -> None:
    pacer = Pacer(INTERVAL, None)
    assert pacer.hold_until([Chunk("")], 100.0) == 0.0  # a chat stream's role delta
    assert pacer.hold_until(text("a"), 100.001) == 0.0  # still the first text


def test_deltas_faster_than_the_interval_are_held_until_it_has_passed() -> None:
    pacer = Pacer(INTERVAL, None)
    pacer.hold_until(text("a"), 100.0)
    assert pacer.hold_until(text("b"), 100.001) == 100.001 + INTERVAL
    assert pacer.hold_until(text("c", "d", "e"), 100.007) == 100.007 + INTERVAL


def test_several_deltas_in_the_first_read_mean_a_fast_stream() -> None:
    assert Pacer(INTERVAL, None).hold_until(text("a", "b"), 100.0) == 100.0 + INTERVAL


def test_a_stream_slower_than_the_interval_is_never_held() -> None:
    pacer = Pacer(INTERVAL, None)
    for step in range(5):
        assert pacer.hold_until(text("x"), 100.0 + step * 0.05) == 0.0


def test_the_end_is_never_held() -> None:
    pacer = Pacer(INTERVAL, None)
    pacer.hold_until(text("a"), 100.0)
    assert pacer.hold_until([Chunk("b", finish_reason="stop")], 100.001) == 0.0


def test_nothing_is_held_once_max_tokens_deltas_came() -> None:
    # llama-server sends the finish reason in an event of its own, after the last token.
    pacer = Pacer(INTERVAL, 3)
    pacer.hold_until(text("a"), 100.0)
    assert pacer.hold_until(text("b"), 100.001) > 0.0
    assert pacer.hold_until(text("c"), 100.002) == 0.0, "the read after the last token waited"
    assert Pacer(INTERVAL, 1).hold_until(text("a", "b"), 100.0) == 0.0


def test_a_max_tokens_that_is_not_an_integer_is_no_limit() -> None:
    pacer = Pacer(INTERVAL, "3")
    pacer.hold_until(text("a"), 100.0)
    assert pacer.hold_until(text("b", "c", "d"), 100.001) > 0.0


class SteppedClock(PacingClock):
    """Time that moves only when the test says so: a `sleep` ends when `advance` passes its deadline.

    Issue 18 finding 12: the stream interval measured on the machine's clock
    made the pacing test fail 2 runs in 5 (`[1, 1, 1, 17]`); the test now
    decides when the interval has passed.
    """

    def __init__(self) -> None:
        self.time = 1000.0
        self.sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self.sleeps = 0

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        entry = (self.time + seconds, asyncio.get_running_loop().create_future())
        self.sleepers.append(entry)
        self.sleeps += 1
        try:
            await entry[1]
        finally:
            self.sleepers.remove(entry)

    def advance(self, seconds: float) -> None:
        self.time += seconds
        for deadline, woken in self.sleepers:
            if deadline <= self.time and not woken.done():
                woken.set_result(None)

    async def held(self) -> float:
        """The deadline of the hold a stream is in, once it is in one."""
        await eventually(lambda: bool(self.sleepers), 10, "the stream to hold its next read")
        return self.sleepers[0][0]


class _OneBackendPool:
    """Stands in for `Pool` in `Inference`: every lease is on `backend`."""

    def __init__(self, backend: Backend, stream_interval_ms: float) -> None:
        self.catalog: dict[str, object] = {}
        self.limits = Limits(stream_interval_ms=stream_interval_ms)
        self._lease = SimpleNamespace(backend=backend, revoked=None, on_revoke=lambda cut: None)

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[SimpleNamespace]:
        yield self._lease


@contextlib.asynccontextmanager
async def relay(backend: Backend, stream_interval_ms: float) -> AsyncIterator[InferenceAsyncStub]:
    """The Inference service in this process, over gRPC, streaming from `backend`."""
    server = grpc.aio.server()
    add_InferenceServicer_to_server(
        Inference(cast(Pool, _OneBackendPool(backend, stream_interval_ms))), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield InferenceStub(channel)
    finally:
        await server.stop(None)


@pytest.fixture
async def stepped(tmp_path: Path, tiny_model: Path, spawned: list[Backend]) -> AsyncIterator[Backend]:
    """A fake backend whose tokens the test releases, paced by a `SteppedClock`."""
    backend = await launch_backend(fake_spec("m", tiny_model, "--stepped"), tmp_path, spawned)
    backend.client.clock = SteppedClock()
    try:
        yield backend
    finally:
        await backend.stop(2.0)


def clock_of(backend: Backend) -> SteppedClock:
    return cast(SteppedClock, backend.client.clock)


async def test_a_fast_stream_comes_as_its_first_delta_then_one_message_per_interval(stepped: Backend) -> None:
    clock = clock_of(stepped)
    async with relay(stepped, stream_interval_ms=1000) as stub:
        call = stub.Complete(inference_pb2.CompleteRequest(model="m", prompt="p", max_tokens=20))
        await release_tokens(stepped.port, 1)
        first = await next_message(call)  # the first delta: never held
        await release_tokens(stepped.port, 1)
        # Came with the clock standing still: the read after the first delta was not held.
        second = await next_message(call)
        # A second delta within the interval: a fast stream, the next read waits one interval.
        assert await clock.held() == clock.time + 1.0
        await release_tokens(stepped.port, 18)  # eighteen writes, then the end of the stream
        clock.advance(1.0)
        rest = await read_all(call)
    deltas = [m for m in [first, second, *rest] if m.text]
    assert [m.token_count for m in deltas] == [1, 1, 18]
    assert rest[-1].usage.completion_tokens == 20
    assert clock.sleeps == 1, "the read after the max_tokens-th delta was held"


async def test_deltas_that_arrive_while_a_batch_is_sent_wait_for_the_next_interval_with_the_rest(
    stepped: Backend,
) -> None:
    # Issue 18 finding 12: the connection was paused only once the consumer
    # came back for more, so a delta that arrived while it sent the previous
    # batch came alone right after the hold, and the rest a moment later:
    # `[1, 1, 1, 17]`, two messages in one interval.
    clock = clock_of(stepped)
    stream = stepped.client.stream("/v1/completions", {"prompt": "p", "max_tokens": 20}, interval=1.0)
    batches: list[list[Chunk]] = []
    try:
        for _ in range(2):
            following = asyncio.ensure_future(anext(stream))
            await release_tokens(stepped.port, 1)
            batches.append(await following)
        # The second delta within the interval: the read after it is held. One
        # more delta comes while the consumer still has the batch, then the rest.
        await release_tokens(stepped.port, 1)
        following = asyncio.ensure_future(anext(stream))
        await clock.held()
        await release_tokens(stepped.port, 17)
        clock.advance(1.0)
        batches.append(await following)
        batches += [batch async for batch in stream]
    finally:
        await stream.aclose()
    counts = [sum(1 for chunk in batch if chunk.text) for batch in batches]
    assert [count for count in counts if count] == [1, 1, 18]


async def test_interval_zero_sends_each_delta_as_it_comes(stepped: Backend) -> None:
    clock = clock_of(stepped)
    async with relay(stepped, stream_interval_ms=0) as stub:
        call = stub.Complete(inference_pb2.CompleteRequest(model="m", prompt="p", max_tokens=10))
        counts = []
        for _ in range(10):
            await release_tokens(stepped.port, 1)
            # With the clock standing still: a held read would never end.
            counts.append((await asyncio.wait_for(next_message(call), 10)).token_count)
        rest = await read_all(call)
    assert counts == [1] * 10
    assert not [m for m in rest if m.text]
    assert clock.sleeps == 0


async def test_through_the_server_the_first_delta_comes_at_once_and_a_paced_stream_ends_whole(
    servers: ServerFactory, tiny_model: Path
) -> None:
    # The pacing itself is shown above with a clock the test steps; here the
    # real server's `[limits] stream_interval_ms` at its largest, whatever the
    # machine's speed: the first delta needs no second one, and nothing is lost.
    config = "[limits]\nstream_interval_ms = 1000\n" + fake_model("m", tiny_model, "--stepped")
    server = servers.start(config)
    async with connect(server.address) as client:
        port = (await client.ready("m")).port
        call = client.inference.Complete(inference_pb2.CompleteRequest(model="m", prompt="p", max_tokens=20))
        await release_tokens(port, 1)
        first = await next_message(call)
        await release_tokens(port, 19)
        rest = await read_all(call)
    assert first.token_count == 1
    assert sum(m.token_count for m in rest) == 19
    assert rest[-1].usage.completion_tokens == 20
