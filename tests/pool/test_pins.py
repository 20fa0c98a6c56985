"""Pins: kept across restarts, saved at once, never resurrected by a race, checked at boot.

Real servers (DESIGN.md item 5; issue 9's findings): the pin file is read
back from the state directory, hostile pin files never stop the server.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import grpc
import pytest

from conftest import (
    Client,
    Events,
    ServerFactory,
    connect,
    eventually,
    fake_model,
    llama_model,
    loaded,
    poll,
    warning,
)
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.testing import is_gone
from over_grpc import PINS, eventually_state, ready, saved_pins, states
from rpc_errors import bad_fields, error_info

# ------------------------------------------------------------------ persistence


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
async def test_pins_and_their_options_survive_a_restart_lemonade_2310(
    servers: ServerFactory, tiny_model: Path, stop_signal: signal.Signals
) -> None:
    config = (
        '[pool]\nmax_loaded = { llm = 2 }\nallowed_args = ["--x"]\n'
        + llama_model("tiny", tiny_model)
        + fake_model("fake", tiny_model, "--load-seconds", "0.2")
    )
    first = servers.start(config)
    async with connect(first.address) as client:
        await client.ready("tiny", pinned=True, options=pb.LoadOptions(ctx_size=1024))
        await client.ready(
            "fake",
            pinned=True,
            options=pb.LoadOptions(idle_unload_seconds=3600, backend_args=pb.BackendArgs(args=["--x", "1"])),
        )
        before = await client.pids()
    assert list(saved_pins(first.state_dir)) == ["tiny", "fake"]

    first.stop(stop_signal)
    await eventually(lambda: all(is_gone(pid) for pid in before.values()), 2, "the backends to die with it")

    second = servers.start(config, state_dir=first.state_dir)
    async with connect(second.address) as client:
        # From sequence 0: the restored loads went through the locked load path, phase by phase.
        events = Events(client.control, since=0)
        tiny = await poll(lambda: ready(client, "tiny"), 30, "tiny to be restored")
        fake = await poll(lambda: ready(client, "fake"), 30, "fake to be restored")
        await events.wait_for(loaded("fake"), 5, "fake loaded")
        events.close()
    assert tiny.pinned
    assert fake.pinned
    assert tiny.options.ctx_size == 1024
    assert fake.options.idle_unload_seconds == 3600
    assert list(fake.options.backend_args.args) == ["--x", "1"]
    assert not tiny.HasField("idle_unload_at"), "a pinned model has no idle countdown"
    assert {tiny.pid, fake.pid}.isdisjoint(before.values())
    phases = [
        (m.load_progress.model, m.load_progress.phase)
        for m in events.messages()
        if m.WhichOneof("event") == "load_progress"
    ]
    for name in ("tiny", "fake"):
        assert (name, pb.LOAD_PHASE_QUEUED) in phases
        assert (name, pb.LOAD_PHASE_LOADING) in phases
    assert "reaped 0 stale backend(s)" in second.log()


async def test_a_pinned_model_that_failed_to_load_is_not_saved(
    servers: ServerFactory, tiny_model: Path
) -> None:
    config = fake_model("broken", tiny_model, "--fail-start") + fake_model("good", tiny_model)
    config = "[pool]\nmax_loaded = { llm = 2 }\n" + config
    first = servers.start(config)
    async with connect(first.address) as client:
        await client.ready("good", pinned=True)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await client.load_all("broken", pinned=True)
        assert error_info(failed.value).reason == "BACKEND_START_FAILED"
    assert list(saved_pins(first.state_dir)) == ["good"]
    first.stop()

    second = servers.start(config, state_dir=first.state_dir)
    async with connect(second.address) as client:
        await poll(lambda: ready(client, "good"), 30, "good to be restored")
        status = await client.control.Status(pb.StatusRequest())
    assert [m.name for m in status.pool.models] == ["good"]
    assert status.pool.backends_started == 1, "the broken model was tried again at boot"


async def test_unpin_and_unload_are_saved_at_once(servers: ServerFactory, tiny_model: Path) -> None:
    config = "[pool]\nmax_loaded = { llm = 2 }\n" + fake_model("a", tiny_model) + fake_model("b", tiny_model)
    server = servers.start(config)
    async with connect(server.address) as client:
        await client.ready("a", pinned=True)
        await client.ready("b", pinned=True)
        assert list(saved_pins(server.state_dir)) == ["a", "b"]
        await client.control.Pin(pb.PinRequest(model="a", pinned=False))
        assert list(saved_pins(server.state_dir)) == ["b"]
        await client.control.Unload(pb.UnloadRequest(model="b"))
        assert saved_pins(server.state_dir) == {}


async def test_a_corrupt_state_file_is_moved_aside_and_the_server_starts(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / PINS).write_text('{"version": 1, "pinned": {"a": {"ctx_size": "big"')
    server = servers.start(fake_model("a", tiny_model), state_dir=state_dir)
    async with connect(server.address) as client:
        events = Events(client.control, since=0)
        _, message = await events.wait_for(warning("STATE_FILE_CORRUPT"), 10, "STATE_FILE_CORRUPT")
        events.close()
        await client.ready("a", pinned=True)  # the server works, and writes a good file again
    aside = list(state_dir.glob(f"{PINS}.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_text().startswith('{"version": 1')
    assert str(aside[0]) in message.warning.message
    assert "is corrupt" in server.log()
    assert list(saved_pins(state_dir)) == ["a"]


async def test_pins_that_no_longer_fit_are_reported_at_boot(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    models = fake_model("a", tiny_model) + fake_model("b", tiny_model)
    first = servers.start("[pool]\nmax_loaded = { llm = 2 }\n" + models)
    async with connect(first.address) as client:
        await client.ready("a", pinned=True)
        await client.ready("b", pinned=True)
    first.stop()

    # The operator lowers the slots to one: a, pinned first, comes back; b is reported.
    second = servers.start("[pool]\nmax_loaded = { llm = 1 }\n" + models, state_dir=first.state_dir)
    async with connect(second.address) as client:
        events = Events(client.control, since=0)
        _, message = await events.wait_for(warning("PINS_NOT_RESTORED"), 10, "PINS_NOT_RESTORED")
        await poll(lambda: ready(client, "a"), 30, "a to be restored")
        events.close()
    assert list(message.warning.models) == ["b"]
    assert "no free llm slot (max_loaded 1)" in message.warning.message
    assert list(saved_pins(first.state_dir)) == ["a"]


async def test_pin_errors(servers: ServerFactory, tiny_model: Path) -> None:
    server = servers.start(llama_model("a", tiny_model))
    async with connect(server.address) as client:
        cases = [
            (pb.PinRequest(model="a"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
            (pb.PinRequest(model="a", pinned=True), grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_LOADED"),
            (pb.PinRequest(model="zz", pinned=True), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
        ]
        for request, code, reason in cases:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.control.Pin(request)
            assert raised.value.code() == code
            assert error_info(raised.value).reason == reason
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.control.Pin(pb.PinRequest(model="a"))
        assert bad_fields(raised.value) == ["pinned"]


# -------------------------------------------------------------------------- issue 9 findings 6, 19


async def test_unload_racing_pin_does_not_bring_the_pin_back(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    config = (
        "[pool]\nmax_loaded = { llm = 2 }\n"
        + fake_model("tiny", tiny_model)
        + fake_model("slow", tiny_model, "--ready-file", str(tmp_path / "slow.ready"))
    )
    server = servers.start(config)
    async with connect(server.address) as client:
        await client.ready("tiny")
        # Holds the load lock until the test lets it end (issue 18 finding 12: was 1.5 s).
        slow = asyncio.ensure_future(client.load_all("slow"))
        await eventually_state(client, "slow", pb.MODEL_STATE_LOADING)
        unload = asyncio.ensure_future(client.control.Unload(pb.UnloadRequest(model="tiny")))

        async def unloading() -> bool | None:
            return (
                True
                if (await states(client)).get("tiny", pb.MODEL_STATE_UNLOADING) == pb.MODEL_STATE_UNLOADING
                else None
            )

        await poll(unloading, 10, "the Unload of tiny to begin")  # then the Pin arrives
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.control.Pin(pb.PinRequest(model="tiny", pinned=True))
        assert error_info(refused.value).reason == "MODEL_NOT_LOADED"
        assert list((await unload).unloaded) == ["tiny"]
        (tmp_path / "slow.ready").touch()
        await slow
        pins = server.state_dir / "pins.json"
        assert not pins.exists() or "tiny" not in json.loads(pins.read_text())["pinned"]
        # A pin that is kept: its restore at the next start marks the moment
        # every saved pin has been acted on (they are all loaded at once).
        await client.control.Pin(pb.PinRequest(model="slow", pinned=True))
    server.stop()
    again = servers.start(config, state_dir=server.state_dir)
    async with connect(again.address) as client:
        # Issue 18 finding 12: was a sleep "for a restored pin to show up".
        await poll(lambda: restored(client, "slow"), 10, "the kept pin to be restored")
        assert "tiny" not in await present(client)


async def present(client: Client) -> set[str]:
    """The models in the pool, loading, or queued to load."""
    pool = (await client.control.Status(pb.StatusRequest())).pool
    return {m.name for m in pool.models} | {pool.load_in_flight.model} | {q.model for q in pool.queue}


async def restored(client: Client, name: str) -> bool | None:
    return True if name in await present(client) else None


# ------------------------------------------------------------------------------ issue 9 finding 18


async def test_a_saved_pin_that_fails_validation_does_not_stop_the_server(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    pins = state_dir / "pins.json"
    entry: dict[str, object] = {"ctx_size": 256, "idle_unload_seconds": None, "backend_args": []}
    config = fake_model("m", tiny_model) + fake_model("n", tiny_model)
    # A context no request could ask for: the file is corrupt, moved aside.
    pins.write_text(json.dumps({"version": 1, "pinned": {"m": {**entry, "ctx_size": (1 << 24) + 1}}}))
    server = servers.start(config, state_dir=state_dir)
    async with connect(server.address) as client:
        events = Events(client.control, since=0)
        await events.wait_for(warning("STATE_FILE_CORRUPT"), 5, "the corrupt state warning")
        assert await states(client) == {}
        events.close()
    server.stop()
    assert list(state_dir.glob("pins.json.corrupt-*"))
    # Backend arguments the operator no longer allows: that pin is dropped, the other restored.
    pins.write_text(
        json.dumps({"version": 1, "pinned": {"m": {**entry, "backend_args": ["--tools", "all"]}, "n": entry}})
    )
    server = servers.start(config, state_dir=state_dir)
    async with connect(server.address) as client:
        events = Events(client.control, since=0)
        _, not_restored = await events.wait_for(warning("PINS_NOT_RESTORED"), 5, "the pin not restored")
        assert list(not_restored.warning.models) == ["m"]
        assert "'--tools' is not allowed" in not_restored.warning.message
        await eventually_state(client, "n", pb.MODEL_STATE_READY)
        events.close()
        saved = json.loads(pins.read_text())
        assert list(saved["pinned"]) == ["n"]


async def test_a_saved_pin_no_request_could_make_is_refused_at_boot_not_an_internal_error(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    """pins.json holding a lone surrogate (valid JSON, "\\ud800"; no gRPC string can carry one)
    as the value of an allowed flag. Promised: a file holding what no request could ask for is
    corrupt (moved aside, STATE_FILE_CORRUPT) or the pin is dropped (PINS_NOT_RESTORED); a
    bug of ours is INTERNAL_ERROR, so it must not end up there.
    """
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    entry = {"ctx_size": 512, "idle_unload_seconds": None, "backend_args": ["--threads", "\ud800"]}
    (state_dir / "pins.json").write_text(json.dumps({"version": 1, "pinned": {"m": entry}}))
    config = '[pool]\nallowed_args = ["--threads"]\n' + fake_model("m", tiny_model)
    server = servers.start(config, state_dir=state_dir)
    async with connect(server.address) as client:
        events = Events(client.control, since=0)
        _, first = await events.wait_for(
            lambda m: m.WhichOneof("event") == "warning", 10, "a warning about the saved pin"
        )
        events.close()
    assert first.warning.code in ("STATE_FILE_CORRUPT", "PINS_NOT_RESTORED"), first.warning
    assert "internal error" not in server.log().lower()
