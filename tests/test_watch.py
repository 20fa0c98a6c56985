"""Watch: a snapshot, then every event with a gap-free sequence; resume or resync."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from conftest import ServerFactory, connect, fake_spec, launcher, llama_model, next_message, shut_down
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2_grpc
from lemonade_grpc.api import convert
from lemonade_grpc.api.interceptors import MalformedRequestInterceptor
from lemonade_grpc.api.model_control import ModelControl
from lemonade_grpc.core.options import RequestedOptions
from lemonade_grpc.core.settings import PoolSettings
from lemonade_grpc.pool import events
from lemonade_grpc.pool.pool import Pool


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
