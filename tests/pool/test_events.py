"""EventBus and Watch: gap-free sequence numbers unique across runs, resume or resync, bounds, close.

The first tests drive the EventBus alone; the Watch tests follow it over gRPC.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from conftest import (
    ServerFactory,
    connect,
    fake_model,
    fake_spec,
    launcher,
    llama_model,
    next_message,
    poll,
    shut_down,
)
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2_grpc
from lemonade_grpc.api import convert
from lemonade_grpc.api.interceptors import MalformedRequestInterceptor
from lemonade_grpc.api.model_control import ModelControl
from lemonade_grpc.core.errors import Overloaded
from lemonade_grpc.core.options import RequestedOptions
from lemonade_grpc.core.settings import PoolSettings
from lemonade_grpc.pool import events
from lemonade_grpc.pool.events import EventBus, PinChanged, PoolWarning, weight
from lemonade_grpc.pool.pool import Pool
from rpc_errors import error_info


def test_sequences_are_gap_free_from_the_first() -> None:
    bus = EventBus(first_sequence=1)
    assert bus.last_sequence == 0
    sequences = [bus.publish(PinChanged("m", True)).sequence for _ in range(5)]
    assert sequences == [1, 2, 3, 4, 5]
    assert bus.last_sequence == 5


def test_each_run_numbers_its_events_above_every_earlier_run() -> None:
    earlier = EventBus()
    for _ in range(1000):
        earlier.publish(PinChanged("m", True))
    later = EventBus()
    assert later.first_sequence > earlier.last_sequence
    # A subscriber of the earlier run resumes against the later one: never replayed wrong events.
    assert later.since(earlier.last_sequence) is None
    assert earlier.since(later.first_sequence + 5) is None


def test_since_resumes_from_the_ring_or_says_it_cannot() -> None:
    bus = EventBus(history=3, first_sequence=1)
    assert bus.since(0) == []  # nothing published yet: nothing missed
    for _ in range(5):
        bus.publish(PinChanged("m", True))
    assert [e.sequence for e in bus.since(3) or []] == [4, 5]
    assert bus.since(5) == []
    assert bus.since(1) is None  # 2 fell out of the ring
    assert bus.since(0) is None  # so did the run's first events
    assert bus.since(2) is not None
    assert bus.since(99) is None  # a number never issued


def test_since_zero_replays_the_whole_run_while_the_ring_holds_it() -> None:
    bus = EventBus(first_sequence=500)
    for _ in range(3):
        bus.publish(PinChanged("m", True))
    assert [e.sequence for e in bus.since(0) or []] == [500, 501, 502]
    assert bus.since(7) is None  # below this run's range


def test_the_ring_is_bounded_in_bytes() -> None:
    big = PoolWarning("X", "x" * 10_000)
    bus = EventBus(history=1000, history_bytes=3 * weight(big), first_sequence=1)
    for _ in range(10):
        bus.publish(big)
    assert [e.sequence for e in bus.since(7) or []] == [8, 9, 10]
    assert bus.since(6) is None  # 7 was dropped for its bytes, not its count


async def test_full_subscriber_overflows_instead_of_blocking() -> None:
    bus = EventBus(subscriber_queue=2, first_sequence=1)
    slow = bus.subscribe()
    fast = bus.subscribe()
    for _ in range(2):
        bus.publish(PinChanged("m", True))
    assert [e.sequence for e in fast.drain()] == [1, 2]
    bus.publish(PinChanged("m", False))  # slow's queue is full: it overflows
    assert slow.overflowed
    assert not fast.overflowed
    assert list(slow.drain()) == []
    slow.reset()
    bus.publish(PinChanged("m", True))
    assert [e.sequence for e in slow.drain()] == [4]
    slow.close()
    slow.close()  # idempotent


async def test_a_subscriber_queue_overflows_on_bytes_too() -> None:
    big = PoolWarning("X", "x" * 10_000)
    bus = EventBus(subscriber_queue=1000, subscriber_bytes=2 * weight(big), first_sequence=1)
    subscriber = bus.subscribe()
    bus.publish(big)
    bus.publish(big)
    assert not subscriber.overflowed
    bus.publish(big)
    assert subscriber.overflowed
    assert list(subscriber.drain()) == []


async def test_close_wakes_every_subscriber_and_ends_later_ones_at_once() -> None:
    bus = EventBus()
    subscriber = bus.subscribe()
    waiting = asyncio.ensure_future(subscriber.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    error = RuntimeError("shutting down")
    bus.close(error)
    await asyncio.wait_for(waiting, 5)
    assert subscriber.closed is error
    bus.publish(PinChanged("m", True))  # nobody listens any more
    assert list(subscriber.drain()) == []
    late = bus.subscribe()
    assert late.closed is error
    await asyncio.wait_for(late.wait(), 5)


def test_subscribers_beyond_the_limit_are_refused_overloaded() -> None:
    bus = EventBus(max_subscribers=2)
    first, second = bus.subscribe(), bus.subscribe()
    with pytest.raises(Overloaded) as refused:
        bus.subscribe()
    assert "2 open (limit 2)" in refused.value.message
    first.close()
    third = bus.subscribe()  # a slot freed is a slot taken
    assert third.closed is None
    second.close()
    third.close()


async def test_subscribers_take_turns_a_few_per_pass_of_the_loop_and_every_one_gets_one() -> None:
    # Issue 13: a thousand Watch streams woken at once put a thousand steps
    # ahead of a concurrent Load in the loop's ready queue.
    bus = EventBus(turns_per_step=2, first_sequence=1)
    subscribers = [bus.subscribe() for _ in range(5)]
    waits = [subscriber.wait() for subscriber in subscribers]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waits), "nothing published: nobody is woken"
    bus.publish(PinChanged("m", True))
    woken = []
    for _ in range(3):
        await asyncio.sleep(0)  # one pass of the loop
        woken.append(sum(w.done() for w in waits))
    assert woken == [2, 4, 5]
    assert [[e.sequence for e in s.drain()] for s in subscribers] == [[1]] * 5


async def test_a_subscriber_with_events_queued_still_waits_for_its_turn() -> None:
    bus = EventBus(turns_per_step=1, first_sequence=1)
    first, second = bus.subscribe(), bus.subscribe()
    bus.publish(PinChanged("m", True))
    bus.publish(PinChanged("m", False))
    turns = [first.wait(), second.wait()]
    assert not any(t.done() for t in turns), "a turn is given by the pump, never at once"
    await asyncio.sleep(0)
    assert [t.done() for t in turns] == [True, False]
    assert first.take() is not None  # one event per turn: the next one waits for another
    again = first.wait()
    await asyncio.sleep(0)
    assert [turns[1].done(), again.done()] == [True, False], "first come, first served"
    await asyncio.sleep(0)
    assert again.done()
    assert [e.sequence for e in first.drain()] == [2]
    assert [e.sequence for e in second.drain()] == [1, 2]


async def test_subscribers_that_leave_while_idle_leave_nothing_behind() -> None:
    # A dashboard reconnecting every minute for days with no event in between
    # must not grow the bus with every visit.
    bus = EventBus(first_sequence=1)
    for _ in range(100):
        subscriber = bus.subscribe()
        waiting = asyncio.ensure_future(subscriber.wait())
        await asyncio.sleep(0)
        waiting.cancel()
        subscriber.close()
    assert not bus._idle
    assert not bus._turns
    assert not bus._subscribers
    # A cancelled turn is skipped: the others still get theirs.
    bus = EventBus(turns_per_step=1, first_sequence=1)
    gone, staying = bus.subscribe(), bus.subscribe()
    bus.publish(PinChanged("m", True))
    cancelled, kept = gone.wait(), staying.wait()
    cancelled.cancel()
    await asyncio.sleep(0)
    assert kept.done()
    assert not kept.cancelled()


def kind(message: pb.WatchResponse) -> str:
    return message.WhichOneof("event") or ""


async def test_snapshot_then_every_event_in_order(servers: ServerFactory, tiny_model: Path) -> None:
    server = servers.start(llama_model("a", tiny_model))
    async with grpc.aio.insecure_channel(server.address) as channel:
        control = model_control_pb2_grpc.ModelControlStub(channel)
        watch = control.Watch(pb.WatchRequest())
        snapshot = await next_message(watch)
        assert kind(snapshot) == "snapshot"
        assert not snapshot.resync
        assert snapshot.sequence == snapshot.snapshot.sequence

        [m async for m in control.Load(pb.LoadRequest(model="a"))]
        await control.Pin(pb.PinRequest(model="a", pinned=True))
        await control.Unload(pb.UnloadRequest(model="a"))

        events = [await next_message(watch)]
        while kind(events[-1]) != "model_unloaded":
            events.append(await next_message(watch))
        watch.cancel()
    assert [e.sequence for e in events] == list(
        range(snapshot.sequence + 1, snapshot.sequence + 1 + len(events))
    )
    kinds = [kind(e) for e in events if kind(e) != "model_state_changed"]
    assert kinds[0] == "load_progress"
    assert kinds[-3:] == ["model_loaded", "pin_changed", "model_unloaded"]
    changes = [e.model_state_changed for e in events if kind(e) == "model_state_changed"]
    assert [(c.state, c.reason) for c in changes] == [
        (pb.MODEL_STATE_LOADING, pb.UNLOAD_REASON_UNSPECIFIED),
        (pb.MODEL_STATE_UNLOADING, pb.UNLOAD_REASON_REQUESTED),
    ]
    phases = [e.load_progress.phase for e in events if kind(e) == "load_progress"]
    assert phases == [pb.LOAD_PHASE_QUEUED, pb.LOAD_PHASE_STARTING, pb.LOAD_PHASE_LOADING]
    [loaded] = [e.model_loaded for e in events if kind(e) == "model_loaded"]
    assert loaded.status.state == pb.MODEL_STATE_READY
    assert events[-1].model_unloaded.reason == pb.UNLOAD_REASON_REQUESTED
    assert all(e.HasField("time") for e in events)


async def test_resume_after_reconnect_and_resync_when_too_old(
    servers: ServerFactory, tiny_model: Path
) -> None:
    server = servers.start(llama_model("a", tiny_model))
    async with grpc.aio.insecure_channel(server.address) as channel:
        control = model_control_pb2_grpc.ModelControlStub(channel)
        [m async for m in control.Load(pb.LoadRequest(model="a"))]
        seen = (await control.Status(pb.StatusRequest())).pool.sequence
        # Disconnected, events happen...
        for pinned in (True, False, True):
            await control.Pin(pb.PinRequest(model="a", pinned=pinned))
        # ...and the reconnecting client gets exactly what it missed, no snapshot.
        resumed = control.Watch(pb.WatchRequest(since_sequence=seen))
        missed = [await next_message(resumed) for _ in range(3)]
        resumed.cancel()
        assert [m.sequence for m in missed] == [seen + 1, seen + 2, seen + 3]
        assert [m.pin_changed.pinned for m in missed] == [True, False, True]

        # A sequence the server never issued (another run's): a fresh snapshot, flagged.
        stale = control.Watch(pb.WatchRequest(since_sequence=10**9))
        first = await next_message(stale)
        stale.cancel()
        assert kind(first) == "snapshot"
        assert first.resync
        assert first.sequence == seen + 3
        assert [m.pinned for m in first.snapshot.models] == [True]


async def test_stalled_subscriber_never_delays_the_pool(servers: ServerFactory, tiny_model: Path) -> None:
    # A queue of one event: the burst of an Unload of both models (two
    # UNLOADING events in one step) must overflow it, whatever the timing.
    config = (
        "[pool]\nmax_loaded = { llm = 2 }\n[limits]\nwatch_queue_events = 1\n"
        + llama_model("a", tiny_model)
        + llama_model("b", tiny_model)
    )
    server = servers.start(config)
    async with grpc.aio.insecure_channel(server.address) as channel:
        control = model_control_pb2_grpc.ModelControlStub(channel)
        [m async for m in control.Load(pb.LoadRequest(model="a"))]
        stalled = control.Watch(pb.WatchRequest())
        start = (await next_message(stalled)).sequence
        # The subscriber now reads nothing while 200 pin changes and a load happen.
        toggles = [control.Pin(pb.PinRequest(model="a", pinned=i % 2 == 0)) for i in range(200)]
        loaded = [m async for m in control.Load(pb.LoadRequest(model="b"))]
        await asyncio.gather(*toggles)
        assert loaded[-1].phase == pb.LOAD_PHASE_READY
        assert sorted((await control.Unload(pb.UnloadRequest())).unloaded) == ["a", "b"]
        end = (await control.Status(pb.StatusRequest())).pool.sequence
        assert end >= start + 200

        # Reading again: every event in order, or a resync snapshot and then in order.
        expected = start + 1
        resyncs = 0
        while expected <= end:
            message = await next_message(stalled)
            if message.resync:
                assert kind(message) == "snapshot"
                expected = message.sequence + 1
                resyncs += 1
                continue
            assert message.sequence == expected
            expected += 1
        stalled.cancel()
    assert resyncs >= 1, "the subscriber's queue never overflowed"


async def test_fan_out_builds_each_event_message_once_for_every_subscriber(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 13: with 1,000 Watch streams the same message was built 1,000
    # times per event. In process: the servicer over a real pool, 20 streams,
    # the events of a load, a pin and an unload (a fake backend).
    built: list[int] = []
    build = convert.watch_event

    def counted(envelope: events.Envelope, server_idle_default: int) -> pb.WatchResponse:
        built.append(envelope.sequence)
        return build(envelope, server_idle_default)

    monkeypatch.setattr(convert, "watch_event", counted)
    pool = Pool({"m": fake_spec("m", tiny_model)}, PoolSettings(), launcher(tmp_path / "logs"))
    server = grpc.aio.server(interceptors=[MalformedRequestInterceptor()])
    model_control_pb2_grpc.add_ModelControlServicer_to_server(ModelControl(pool), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            control = model_control_pb2_grpc.ModelControlStub(channel)
            watches = [control.Watch(pb.WatchRequest()) for _ in range(20)]
            starts = {(await next_message(watch)).sequence for watch in watches}
            assert len(starts) == 1
            await pool.load("m", RequestedOptions()).outcome()
            await pool.pin("m", True)
            await pool.unload("m")
            end = pool.bus.last_sequence
            received = []
            for watch in watches:
                messages = [await next_message(watch) for _ in range(end - min(starts))]
                watch.cancel()
                received.append([(m.sequence, m.SerializeToString()) for m in messages])
    finally:
        await server.stop(None)
        await shut_down(pool)
    assert all(r == received[0] for r in received), "every subscriber gets the same messages"
    assert [sequence for sequence, _ in received[0]] == list(range(min(starts) + 1, end + 1))
    assert sorted(built) == list(range(min(starts) + 1, end + 1)), "each event's message built once"


def test_a_subscriber_far_behind_gets_an_event_built_again() -> None:
    messages = convert.WatchMessages(size=2)
    envelopes = [events.Envelope(n, 1.0, events.PinChanged("m", n % 2 == 0)) for n in (1, 2, 3)]
    first = messages.get(envelopes[0], 0)
    assert messages.get(envelopes[0], 0) is first
    for envelope in envelopes[1:]:
        messages.get(envelope, 0)
    again = messages.get(envelopes[0], 0)  # gone from the last two: built again, the same message
    assert again is not first
    assert again == first
    assert messages.built == 4


async def test_finding_11_a_load_that_keeps_the_process_ends_on_watch_with_the_new_options(
    servers: ServerFactory, tiny_model: Path
) -> None:
    # Issue 18 finding 11: a Load changing only idle_unload_seconds answered already_loaded but put one
    # QUEUED on Watch and nothing after: a dashboard showed the model queued forever, and nothing said
    # that its options had changed.
    server = servers.start(llama_model("a", tiny_model))
    async with connect(server.address) as client:
        await client.ready("a")
        control = client.control
        watch = control.Watch(pb.WatchRequest())
        await next_message(watch)  # the snapshot
        options = pb.LoadOptions(idle_unload_seconds=3600)
        answer = [m async for m in control.Load(pb.LoadRequest(model="a", options=options, pinned=True))]
        assert answer[-1].already_loaded
        seen = [await next_message(watch)]
        while kind(seen[-1]) not in ("model_updated", "model_loaded", "load_failed"):
            seen.append(await asyncio.wait_for(next_message(watch), 15))
        # The Load's own last answer and Status agree with what Watch said.
        status = await control.Status(pb.StatusRequest())
        watch.cancel()
    assert [kind(m) for m in seen] == ["load_progress", "pin_changed", "model_updated"]
    assert seen[0].load_progress.phase == pb.LOAD_PHASE_QUEUED
    updated = seen[-1].model_updated.status
    assert (updated.name, updated.options.idle_unload_seconds, updated.pinned) == ("a", 3600, True)
    assert updated.pid == answer[-1].status.pid == status.pool.models[0].pid
    assert updated.options == answer[-1].status.options == status.pool.models[0].options


async def test_watch_streams_beyond_the_limit_are_refused_overloaded(
    servers: ServerFactory, tiny_model: Path
) -> None:
    server = servers.start("[limits]\nmax_watch_streams = 2\n" + fake_model("m", tiny_model))
    async with connect(server.address) as client:
        open_ = [client.control.Watch(pb.WatchRequest()) for _ in range(2)]
        for watch in open_:
            assert (await next_message(watch)).WhichOneof("event") == "snapshot"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await next_message(client.control.Watch(pb.WatchRequest()))
        assert (refused.value.code(), error_info(refused.value).reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "OVERLOADED",
        )
        open_[0].cancel()

        async def watch_again() -> pb.WatchResponse | None:
            try:
                return await next_message(client.control.Watch(pb.WatchRequest()))
            except grpc.aio.AioRpcError:
                return None  # the cancelled one is not closed yet

        assert (await poll(watch_again, 10, "a Watch slot to free up")).WhichOneof("event") == "snapshot"
        open_[1].cancel()
