"""The pool's rules (DESIGN.md items 1-4 and 7), each pinned by the bug it comes from.

Fake backends write their pid to a log when they start, so "how many
processes ever existed" is the operating system's answer, not our counter's.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from conftest import (
    FAKE_BACKEND,
    TAG_VAR,
    ServerFactory,
    alive,
    connect,
    eventually,
    fake_model,
    is_gone,
    llama_model,
    next_message,
    pids_in,
    poll,
    read_all,
)
from lemonade_grpc._gen.lemonade.v1 import inference_pb2
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.store.backend_records import BackendRegistry
from rpc_errors import bad_fields, error_info


@pytest.fixture
def pid_log(tmp_path: Path) -> Path:
    return tmp_path / "pids.log"


async def test_fifty_concurrent_loads_start_one_process_unsloth_5161(
    servers: ServerFactory, tiny_model: Path, pid_log: Path
) -> None:
    config = fake_model("slow", tiny_model, "--load-seconds", "0.5", "--pid-log", str(pid_log))
    server = servers.start(config)
    async with connect(server.address) as client:
        streams = await asyncio.gather(*(client.load("slow") for _ in range(50)))
        assert len(pids_in(pid_log)) == 1, "one model, one process, however many ask at once"
        [pid] = pids_in(pid_log)
        for responses in streams:
            assert responses[-1].status.pid == pid
        # Joined requests see the same load: each saw it start and load, not only READY.
        joined = [r for r in streams if not r[-1].already_loaded]
        assert joined, "at least the first request waited for the load"
        for responses in joined:
            phases = [r.phase for r in responses]
            assert pb.LOAD_PHASE_STARTING in phases
            assert pb.LOAD_PHASE_LOADING in phases
        status = await client.control.Status(pb.StatusRequest())
        assert status.pool.backends_started == 1


async def test_alternating_options_never_leave_two_processes_lemonade_1603(
    servers: ServerFactory, tiny_model: Path, pid_log: Path
) -> None:
    server = servers.start(fake_model("m", tiny_model, "--load-seconds", "0.05", "--pid-log", str(pid_log)))
    most_alive = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal most_alive
        while not done.is_set():
            most_alive = max(most_alive, len(alive(pids_in(pid_log))))
            await asyncio.sleep(0.002)

    sizes = [512, 1024] * 6
    started = [asyncio.Event() for _ in sizes]

    async with connect(server.address) as client:

        async def load(index: int) -> pb.ModelStatus:
            # Each request arrives once the one before holds the lock, so
            # none can join another (identical requests queued together
            # coalesce into one load): twelve loads, each a reload.
            if index:
                await started[index - 1].wait()
            responses = []
            request = pb.LoadRequest(model="m", options=pb.LoadOptions(ctx_size=sizes[index]))
            async for response in client.control.Load(request):
                responses.append(response)
                if response.phase >= pb.LOAD_PHASE_STARTING:
                    started[index].set()
            started[index].set()
            assert responses[-1].phase == pb.LOAD_PHASE_READY
            return responses[-1].status

        sampler = asyncio.create_task(sample())
        results = await asyncio.gather(*(load(i) for i in range(len(sizes))))
        done.set()
        await sampler
        status = await client.control.Status(pb.StatusRequest())
    assert status.pool.backends_started == len(sizes)
    assert len(pids_in(pid_log)) == len(sizes)
    assert most_alive == 1
    assert len(alive(pids_in(pid_log))) == 1
    # Every request got what it asked for at the time it was answered.
    assert [r.options.ctx_size for r in results] == sizes


async def test_load_while_inference_loads_does_not_reload_lemonade_1604(
    servers: ServerFactory, tiny_model: Path, pid_log: Path
) -> None:
    # The load ends when the test says, once the Load waits for it (issue 18
    # finding 12: was a 0.3 s load, which a slow Load could miss altogether).
    loaded = pid_log.with_name("m.ready")
    config = fake_model("m", tiny_model, "--ready-file", str(loaded), "--pid-log", str(pid_log))
    server = servers.start(config)
    async with connect(server.address) as client:
        completion = client.inference.Complete(
            inference_pb2.CompleteRequest(model="m", prompt="x", max_tokens=3)
        )
        first = asyncio.create_task(next_message(completion))
        # Wait until the inference-triggered load is under way, then ask again.
        await eventually(lambda: len(pids_in(pid_log)) == 1, 10, "the inference-triggered load to spawn")
        waiters = (await client.control.Status(pb.StatusRequest())).pool.load_in_flight.waiters
        asking = asyncio.ensure_future(client.ready("m"))

        async def waiting() -> bool | None:
            pool = (await client.control.Status(pb.StatusRequest())).pool
            joined = pool.load_in_flight.model == "m" and pool.load_in_flight.waiters > waiters
            return True if joined or [q for q in pool.queue if q.model == "m"] else None

        await poll(waiting, 10, "the Load to join or queue behind the inference-triggered load")
        loaded.touch()
        ready = await asking
        await first
        assert [ready.pid] == pids_in(pid_log)

        # A model loaded with other options is used as it is by inference, never reloaded.
        reloaded = await client.ready("m", options=pb.LoadOptions(ctx_size=777))
        async for _ in client.inference.Complete(inference_pb2.CompleteRequest(model="m", prompt="x")):
            pass
        assert (await client.pids()) == {"m": reloaded.pid}
        assert len(pids_in(pid_log)) == 2


async def test_lru_evicts_the_least_recently_used(servers: ServerFactory, tiny_model: Path) -> None:
    config = "[pool]\nmax_loaded = { llm = 2 }\n" + "".join(llama_model(n, tiny_model) for n in "abc")
    server = servers.start(config)
    async with connect(server.address) as client:
        watch = client.control.Watch(pb.WatchRequest())
        assert (await next_message(watch)).HasField("snapshot")
        a = await client.ready("a")
        b = await client.ready("b")
        async for _ in client.inference.Complete(
            inference_pb2.CompleteRequest(model="a", prompt="x", max_tokens=2)
        ):
            pass  # a is now more recently used than b
        c_load = await client.load("c")
        assert list(c_load[-1].evicted) == ["b"]
        assert pb.LOAD_PHASE_EVICTING in [r.phase for r in c_load]
        assert (await client.pids()) == {"a": a.pid, "c": c_load[-1].status.pid}
        await eventually(lambda: is_gone(b.pid), 5, "the evicted backend to exit")

        unloaded = None
        while unloaded is None:
            message = await next_message(watch)
            if message.HasField("model_unloaded"):
                unloaded = message.model_unloaded
        assert unloaded.model == "b"
        assert unloaded.reason == pb.UNLOAD_REASON_EVICTED_LRU
        assert unloaded.pid == b.pid
        watch.cancel()


async def test_all_slots_pinned_fails_and_evicts_nothing_lemonade_2226(
    servers: ServerFactory, tiny_model: Path
) -> None:
    config = "[pool]\nmax_loaded = { llm = 2 }\n" + "".join(llama_model(n, tiny_model) for n in "abc")
    server = servers.start(config)
    async with connect(server.address) as client:
        a = await client.ready("a", pinned=True)
        b = await client.ready("b", pinned=True)
        assert a.pinned
        assert b.pinned
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.load("c")
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(raised.value).reason == "SLOTS_PINNED"
        assert (await client.pids()) == {"a": a.pid, "b": b.pid}

        unpinned = await client.control.Pin(pb.PinRequest(model="b", pinned=False))
        assert not unpinned.status.pinned
        c = await client.ready("c")
        assert (await client.pids()) == {"a": a.pid, "c": c.pid}
        # A bare Load keeps the pin it finds.
        again = await client.load("a")
        assert again[-1].already_loaded
        assert again[-1].status.pinned


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


async def test_busy_victim_gets_the_grace_period_then_model_evicted(
    servers: ServerFactory, tiny_model: Path
) -> None:
    config = "[pool]\nevict_grace_seconds = 0.5\n" + fake_model("slow", tiny_model, "--token-seconds", "0.05")
    config += fake_model("other", tiny_model)
    server = servers.start(config)
    async with connect(server.address) as client:
        stream = client.inference.Complete(
            inference_pb2.CompleteRequest(model="slow", prompt="x", max_tokens=1000)
        )
        first = await next_message(stream)
        assert first.text
        other = await client.ready("other")
        assert other.state == pb.MODEL_STATE_READY
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await read_all(stream)
        assert raised.value.code() == grpc.StatusCode.ABORTED
        assert error_info(raised.value).reason == "MODEL_EVICTED"


@pytest.mark.parametrize("flags", [(), ("--ignore-sigterm",)], ids=["obeys-sigterm", "ignores-sigterm"])
async def test_unload_during_slow_load_cancels_it_and_kills_the_process(
    servers: ServerFactory, tiny_model: Path, pid_log: Path, flags: tuple[str, ...]
) -> None:
    config = "[pool]\nstop_grace_seconds = 0.5\n"
    config += fake_model("slow", tiny_model, "--load-seconds", "60", "--pid-log", str(pid_log), *flags)
    server = servers.start(config)
    async with connect(server.address) as client:
        stream = client.control.Load(pb.LoadRequest(model="slow"))
        while (await next_message(stream)).phase != pb.LOAD_PHASE_LOADING:
            pass
        await eventually(lambda: len(pids_in(pid_log)) == 1, 10, "the backend to start")
        [pid] = pids_in(pid_log)
        started = time.monotonic()
        unloaded = await client.control.Unload(pb.UnloadRequest(model="slow"))
        assert list(unloaded.unloaded) == ["slow"]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            # Far less than the 60 s load: the cancel does not wait for it.
            await asyncio.wait_for(next_message(stream), 10)
        elapsed = time.monotonic() - started
        assert raised.value.code() == grpc.StatusCode.ABORTED
        assert error_info(raised.value).reason == "LOAD_CANCELLED"
        assert is_gone(pid), f"backend still running {elapsed:.2f} s after Unload returned"
        assert (await client.pids()) == {}


async def test_kill_9_of_the_server_takes_its_backends_along(
    servers: ServerFactory, tiny_model: Path
) -> None:
    config = (
        "[pool]\nmax_loaded = { llm = 2 }\n" + llama_model("a", tiny_model) + llama_model("b", tiny_model)
    )
    server = servers.start(config)
    async with connect(server.address) as client:
        pids = [(await client.ready(name)).pid for name in "ab"]
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    await eventually(lambda: all(is_gone(pid) for pid in pids), 2, "every backend to die with the server")

    again = servers.start(config, state_dir=server.state_dir)
    assert "reaped 0 stale backend(s)" in again.log()


@pytest.fixture
def survivor(tiny_model: Path, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A fake backend in its own session, standing for one that outlived its control plane."""
    process = subprocess.Popen(
        [sys.executable, str(FAKE_BACKEND), "--port", "0", "--model", str(tiny_model)],
        start_new_session=True,
        env={TAG_VAR: f"survivor-{tmp_path.name}"},
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_backends_that_survived_a_crash_are_reaped_at_boot(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path, survivor: subprocess.Popen[bytes]
) -> None:
    state_dir = tmp_path / "state"
    await BackendRegistry(state_dir / "backends.json").add(survivor.pid, "ghost")
    server = servers.start(llama_model("a", tiny_model), state_dir=state_dir)
    assert survivor.wait(5) == -signal.SIGKILL
    assert "reaped stale backend of ghost" in server.log()
    async with connect(server.address) as client:
        replay = client.control.Watch(pb.WatchRequest(since_sequence=0))
        first = await next_message(replay)
        assert first.warning.code == "STALE_BACKENDS_REAPED"
        assert list(first.warning.models) == ["ghost"]
        replay.cancel()


async def test_finding_10_without_setpriv_a_backend_left_unrecorded_by_a_crash_is_reaped_at_boot(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    # Issue 18 finding 10: without setpriv (no parent-death signal), a crash of the server between a
    # backend's spawn and its record left a backend that no boot would find (4 in 30 SIGKILLs).
    no_setpriv = {"PATH": str(tmp_path / "empty-bin")}
    pid_log = tmp_path / "pids"
    config = fake_model("m", tiny_model, "--pid-log", str(pid_log), "--load-seconds", "60")
    server = servers.start(config, env=no_setpriv)
    async with connect(server.address) as client:
        load = client.control.Load(pb.LoadRequest(model="m"))
        await eventually(lambda: len(pids_in(pid_log)) == 1, 15, "the backend to be spawned")
        [pid] = pids_in(pid_log)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
        load.cancel()
    assert not is_gone(pid), "the backend died with the server: setpriv was used after all"
    # What a crash between the spawn and the record leaves: a live backend that no record names.
    (server.state_dir / "backends.json").write_text('{"backends": []}')
    again = servers.start(config, state_dir=server.state_dir, env=no_setpriv)
    await eventually(lambda: is_gone(pid), 10, f"the unrecorded backend pid {pid} to be reaped")
    assert f"reaped stale backend of m, pid {pid}, left unrecorded by a previous run" in again.log()
    assert "reaped 1 stale backend(s)" in again.log()


async def test_queued_loads_report_their_place_and_status_shows_the_queue(
    servers: ServerFactory, tiny_model: Path
) -> None:
    config = "[pool]\nmax_loaded = { llm = 3 }\n" + fake_model("a", tiny_model, "--load-seconds", "1")
    config += fake_model("b", tiny_model) + fake_model("c", tiny_model)
    server = servers.start(config)
    async with connect(server.address) as client:
        a = client.control.Load(pb.LoadRequest(model="a"))
        while (await next_message(a)).phase != pb.LOAD_PHASE_LOADING:
            pass
        b = client.control.Load(pb.LoadRequest(model="b"))
        assert (await next_message(b)).queue_position == 1
        c = client.control.Load(pb.LoadRequest(model="c"))
        assert (await next_message(c)).queue_position == 2

        status = (await client.control.Status(pb.StatusRequest())).pool
        assert status.load_in_flight.model == "a"
        assert status.load_in_flight.phase == pb.LOAD_PHASE_LOADING
        assert [q.model for q in status.queue] == ["b", "c"]

        # When a finishes and b takes the lock, only b is ahead of c.
        c_rest = await read_all(c)
        assert [r.queue_position for r in c_rest if r.phase == pb.LOAD_PHASE_QUEUED] == [1]
        assert c_rest[-1].phase == pb.LOAD_PHASE_READY
        assert (await read_all(a))[-1].phase == pb.LOAD_PHASE_READY
        assert (await read_all(b))[-1].phase == pb.LOAD_PHASE_READY
