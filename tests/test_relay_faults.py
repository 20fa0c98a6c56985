"""The inference relay, the Load stream and the pool's timers under faults (issue #9, adversarial pass).

A hostile backend (below, `HOSTILE_BACKEND`, written to the test's directory
and run through the `command` recipe) sends what the fake backend cannot:
malformed stream events, a body that ends without `data: [DONE]` while the
process lives on, a /health that turns 503 for good after READY. The
promises under attack: every error carries ErrorInfo with the right reason
(never INTERNAL for a backend's fault), leases and stream counts never leak,
idle timers re-arm, a revoked lease ends its stream at the end of its
grace (not when the process finally dies), and the memory watcher stops no
more than it must. Those last three, and the malformed events, failed before
their fixes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest

from conftest import (
    FAKE_BACKEND,
    Client,
    Events,
    ServerFactory,
    connect,
    eventually,
    fake_model,
    is_gone,
    launcher,
    next_message,
    pids_in,
    poll,
    post_to_backend,
    read_all,
    shut_down,
    unloaded,
)
from lemonade_grpc._gen.lemonade.v1 import inference_pb2
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.core.catalog import ModelSpec, ModelType, Recipe
from lemonade_grpc.core.options import EffectiveOptions, RequestedOptions
from lemonade_grpc.core.settings import PoolSettings
from lemonade_grpc.pool.events import ModelStateChanged
from lemonade_grpc.pool.model import ModelState, ModelView
from lemonade_grpc.pool.pool import Pool
from rpc_errors import error_info

HOSTILE_BACKEND = r"""
import argparse, asyncio, json, sys, time

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--mode", default="ok")
parser.add_argument("--health-503-after", type=float, default=-1.0)
args, _ = parser.parse_known_args()
started = time.monotonic()

def sse(event):
    return b"data: " + (event if isinstance(event, bytes) else json.dumps(event).encode()) + b"\n\n"

GOOD = {"choices": [{"text": "tok ", "index": 0, "finish_reason": None}]}
FINAL = {"choices": [{"text": "", "index": 0, "finish_reason": "length"}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 2},
         "timings": {"prompt_ms": 0.1, "predicted_per_second": 10.0}}
BAD = {
    "list": b"[1, 2]",
    "text-int": {"choices": [{"text": 5, "index": 0, "finish_reason": None}]},
    "choices-str": {"choices": "abc"},
    "error-code-str": {"error": {"code": "abc", "message": "odd"}},
    "usage-negative": {**FINAL, "usage": {"prompt_tokens": -1, "completion_tokens": -5}},
    "usage-huge": {**FINAL, "usage": {"prompt_tokens": 1, "completion_tokens": 2**40}},
    "finish-list": {"choices": [{"text": "", "index": 0, "finish_reason": ["stop"]}]},
    "timings-str": {**FINAL, "timings": {"prompt_ms": "x", "predicted_per_second": "y"}},
    "null": b"null",
}

async def handle(reader, writer):
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        line, *rest = head.decode("latin-1").split("\r\n")
        method, path, _ = line.split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in rest if h)}
        await reader.readexactly(int(headers.get("content-length", "0")))
        if path == "/health":
            late = args.health_503_after >= 0 and time.monotonic() - started > args.health_503_after
            status, body = (503, b'{"error":"busy"}') if late else (200, b'{"status":"ok"}')
            writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (status, len(body), body))
            await writer.drain()
            return
        if args.mode == "http500-binary":
            body = b"\xff\xfe\x80 not utf-8"
            writer.write(b"HTTP/1.1 500 X\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            return
        if args.mode == "not-http":
            writer.write(b"garbage that is not HTTP\r\n\r\n")
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        writer.write(sse(GOOD))
        await writer.drain()
        if args.mode == "no-done":
            return  # the body ends (close-delimited) with no [DONE]; the process lives on
        if args.mode in BAD:
            writer.write(sse(BAD[args.mode]))
            if args.mode.startswith(("usage", "timings")):
                writer.write(b"data: [DONE]\n\n")
            await writer.drain()
            await asyncio.sleep(0.2)
            return
        writer.write(sse(GOOD) + sse(FINAL) + b"data: [DONE]\n\n")
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", args.port)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def hostile_model(name: str, tmp_path: Path, tiny_model: Path, *flags: str) -> str:
    """A catalog entry (TOML) running the hostile backend above with `flags`."""
    script = tmp_path / "hostile_backend.py"
    script.write_text(HOSTILE_BACKEND)
    command = [sys.executable, str(script), "--port", "{port}", "--model", "{path}", *flags]
    quoted = ", ".join(f'"{part}"' for part in command)
    return f'[models.{name}]\nrecipe = "command"\npath = "{tiny_model}"\ntype = "llm"\ncommand = [{quoted}]\n'


Stream = grpc.aio.UnaryStreamCall[inference_pb2.CompleteRequest, inference_pb2.CompleteResponse]


def complete(client: Client, model: str, tokens: int = 8, prompt: str = "x", **kw: object) -> Stream:
    return client.inference.Complete(
        inference_pb2.CompleteRequest(model=model, prompt=prompt, max_tokens=tokens),
        **kw,  # type: ignore[arg-type]
    )


async def pool_status(client: Client) -> pb.PoolStatus:
    return (await client.control.Status(pb.StatusRequest())).pool


async def streams(client: Client) -> tuple[int, int]:
    pool = await pool_status(client)
    return pool.streams_running, pool.streams_queued


async def wait_streams(client: Client, want: tuple[int, int], seconds: float = 10.0) -> None:
    async def reached() -> bool | None:
        return True if await streams(client) == want else None

    await poll(reached, seconds, f"streams (running, queued) == {want}")


async def failure(call: Stream) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await read_all(call)
    return raised.value.code(), error_info(raised.value).reason


# ------------------------------------------------------- (a) the relay


# "not-http" (answered BACKEND_ERROR since issue 18 finding 14) is the control: the rest answered INTERNAL.
MALFORMED = [
    "not-http",
    "http500-binary",
    "list",
    "null",
    "text-int",
    "choices-str",
    "error-code-str",
    "usage-negative",
    "usage-huge",
    "finish-list",
    "timings-str",
]


async def test_malformed_backend_events_end_backend_error_never_internal(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    config = "".join(
        hostile_model(mode.replace("-", "_"), tmp_path, tiny_model, "--mode", mode) for mode in MALFORMED
    )
    server = servers.start(f"[pool]\nmax_loaded = {{ llm = {len(MALFORMED)} }}\n" + config)
    outcomes = {}
    async with connect(server.address) as client:
        for mode in MALFORMED:
            try:
                await read_all(complete(client, mode.replace("-", "_")))
                outcomes[mode] = ("OK", "")
            except grpc.aio.AioRpcError as error:
                outcomes[mode] = (error.code().name, error_info(error).reason)
        await wait_streams(client, (0, 0))
    wrong = {mode: got for mode, got in outcomes.items() if got[1] in ("INTERNAL_ERROR", "")}
    assert not wrong, f"a backend's malformed stream answered as a bug of ours: {wrong} (all: {outcomes})"


async def test_a_body_that_ends_without_done_is_backend_crashed_and_leaves_no_lease(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    server = servers.start(hostile_model("m", tmp_path, tiny_model, "--mode", "no-done"))
    async with connect(server.address) as client:
        for _ in range(3):
            assert await failure(complete(client, "m")) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_CRASHED")
        await wait_streams(client, (0, 0))
        [model] = (await pool_status(client)).models
        assert model.in_flight == 0


async def test_a_backend_crash_mid_stream_is_backend_crashed_and_counts_return_to_zero(
    servers: ServerFactory, tiny_model: Path
) -> None:
    server = servers.start(
        fake_model("m", tiny_model, "--crash-after-tokens", "5", "--token-seconds", "0.02")
    )
    async with connect(server.address) as client:
        calls = [complete(client, "m", 1000, prompt=f"p{i}") for i in range(3)]
        results = await asyncio.gather(*(failure(call) for call in calls))
        assert set(results) == {(grpc.StatusCode.UNAVAILABLE, "BACKEND_CRASHED")}
        await wait_streams(client, (0, 0))

        async def crash_seen() -> bool | None:
            return True if await model_state(client, "m") != pb.MODEL_STATE_READY else None

        # Once the pool has seen the crash, a request for the crashed (unpinned) model loads it
        # again and runs. (Before, a request can still reach the dying backend, whose port took
        # the connection: BACKEND_CRASHED again, as the loop under CPU burners saw. A refused
        # connection is retried: test_a_backend_refusing_connections_is_a_crash….)
        await poll(crash_seen, 30, "the pool to see the crash")
        chunks = await read_all(complete(client, "m", 3))
        assert chunks[-1].usage.completion_tokens == 3


async def test_a_backend_refusing_connections_is_a_crash_and_the_request_loads_the_model_anew(
    servers: ServerFactory, tiny_model: Path
) -> None:
    """Issue 18: a request reaching a READY model whose backend had just died met "connection
    refused" and ended BACKEND_CRASHED while the model stayed READY until the watchdog saw the
    exit. Here the backend stops listening and stays alive (health checks off), so nothing but
    the refusal tells: the pool must count it a crash, and the request, which reached nothing,
    runs on the model loaded anew."""
    server = servers.start("[pool]\nhealth_check_seconds = 0\n" + fake_model("m", tiny_model))
    async with connect(server.address) as client:
        assert (await read_all(complete(client, "m", 2)))[-1].usage.completion_tokens == 2
        [before] = (await pool_status(client)).models
        await post_to_backend(before.port, "/unlisten", {})
        chunks = await read_all(complete(client, "m", 3))
        assert chunks[-1].usage.completion_tokens == 3
        [after] = (await pool_status(client)).models
        assert (after.state, after.pinned) == (pb.MODEL_STATE_READY, False)
        assert after.pid != before.pid
        await poll(functools.partial(killed, before.pid), 10, "the refusing backend to be killed")
        # A unary RPC takes the same path: once more, on a backend that stops listening.
        await post_to_backend(after.port, "/unlisten", {})
        tokens = await client.inference.Tokenize(inference_pb2.TokenizeRequest(model="m", text="a b"))
        assert len(tokens.ids) == 2
        [again] = (await pool_status(client)).models
        assert again.pid not in (before.pid, after.pid)
        await poll(functools.partial(killed, after.pid), 10, "the second refusing backend to be killed")


async def killed(pid: int) -> bool | None:
    return True if is_gone(pid) else None


async def test_cancel_and_deadline_at_every_point_leave_no_lease_and_rearm_the_idle_timer(
    servers: ServerFactory, tiny_model: Path
) -> None:
    # Slow load (1 s) and slow tokens; one stream slot so later streams queue.
    config = "[pool]\nidle_unload_seconds = 30\n[limits]\nmax_streams = 1\n" + fake_model(
        "m", tiny_model, "--load-seconds", "1", "--token-seconds", "0.01"
    )
    server = servers.start(config)
    async with connect(server.address) as client:
        # Cancelled while its model loads: the load goes on and ends READY with its timer armed.
        loading = complete(client, "m", 5)
        await eventually_async(lambda: model_state(client, "m"), pb.MODEL_STATE_LOADING)
        loading.cancel()
        await eventually_async(lambda: model_state(client, "m"), pb.MODEL_STATE_READY)
        await wait_streams(client, (0, 0))
        [model] = (await pool_status(client)).models
        assert model.in_flight == 0
        assert model.HasField("idle_unload_at")
        # Deadlines from 0 to 300 ms: before admission, queued, mid-stream, at the end.
        calls = [complete(client, "m", 20, prompt=f"d{i}", timeout=i * 0.01) for i in range(30)]
        ended = await asyncio.gather(*(read_all(call) for call in calls), return_exceptions=True)
        codes = {e.code() for e in ended if isinstance(e, grpc.aio.AioRpcError)}
        assert codes <= {grpc.StatusCode.DEADLINE_EXCEEDED}, codes
        await wait_streams(client, (0, 0))
        [model] = (await pool_status(client)).models
        assert model.in_flight == 0
        assert model.HasField("idle_unload_at"), "the idle countdown did not start again"


async def model_state(client: Client, name: str) -> pb.ModelState.ValueType | None:
    for model in (await pool_status(client)).models:
        if model.name == name:
            return model.state
    return None


async def eventually_async(
    read: Callable[[], Awaitable[pb.ModelState.ValueType | None]],
    want: pb.ModelState.ValueType,
    seconds: float = 10.0,
) -> None:
    async def reached() -> bool | None:
        return True if await read() == want else None

    await poll(reached, seconds, f"state {pb.ModelState.Name(want)}")


# --------------------------------------------------- (b) the Load stream


async def test_concurrent_loads_each_see_phases_in_order_and_queue_positions_only_fall(
    servers: ServerFactory, tiny_model: Path
) -> None:
    names = ["a", "b", "c", "d"]
    config = "[pool]\nmax_loaded = { llm = 4 }\n" + "".join(
        fake_model(name, tiny_model, "--load-seconds", "0.4") for name in names
    )
    server = servers.start(config)
    async with connect(server.address) as client:
        calls = {name: client.control.Load(pb.LoadRequest(model=name)) for name in names}
        # A follower of d that leaves while d is queued; d's job goes on.
        leaver = client.control.Load(pb.LoadRequest(model="d"))
        first = await next_message(leaver)
        assert first.phase == pb.LOAD_PHASE_QUEUED

        async def waiters_of_d() -> int | None:
            pool = await pool_status(client)
            for load in [pool.load_in_flight, *pool.queue]:
                if load.model == "d":
                    return load.waiters
            return None

        def d_waiters_are(count: int) -> Callable[[], Awaitable[bool | None]]:
            async def check() -> bool | None:
                return True if await waiters_of_d() == count else None

            return check

        # Both of d's Loads are in (the calls reach the server in no set order).
        await poll(d_waiters_are(2), 5, "d queued with its two followers")
        leaver.cancel()
        await poll(d_waiters_are(1), 5, "d's waiters to fall to 1")
        replies = {name: [r async for r in call] for name, call in calls.items()}
    for name, messages in replies.items():
        phases = [m.phase for m in messages]
        assert phases[0] == pb.LOAD_PHASE_QUEUED, (name, phases)
        assert phases[-1] == pb.LOAD_PHASE_READY, (name, phases)
        assert phases == sorted(phases), f"{name}: phases went back: {phases}"
        positions = [m.queue_position for m in messages if m.phase == pb.LOAD_PHASE_QUEUED]
        assert positions == sorted(positions, reverse=True), f"{name}: queue position grew: {positions}"


async def test_a_load_with_other_options_during_a_load_reloads_after_it(
    servers: ServerFactory, tiny_model: Path
) -> None:
    server = servers.start(fake_model("m", tiny_model, "--load-seconds", "0.5"))
    async with connect(server.address) as client:
        small = asyncio.ensure_future(client.load("m", options=pb.LoadOptions(ctx_size=256)))
        await eventually_async(lambda: model_state(client, "m"), pb.MODEL_STATE_LOADING)
        big = await client.load("m", options=pb.LoadOptions(ctx_size=512))
        first = await small
        assert first[-1].phase == big[-1].phase == pb.LOAD_PHASE_READY
        assert first[-1].status.options.ctx_size == 256
        assert big[-1].status.options.ctx_size == 512
        assert big[-1].status.pid != first[-1].status.pid
        assert not big[-1].already_loaded
        await eventually(lambda: is_gone(first[-1].status.pid), 5, "the first process to be stopped")
        [model] = (await pool_status(client)).models
        assert model.options.ctx_size == 512
        assert model.state == pb.MODEL_STATE_READY


# ------------------------------------------------------------ (c) timers


async def test_a_backend_answering_503_for_good_after_ready_is_declared_hung(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    config = (
        "[pool]\nhealth_check_seconds = 0.2\nhealth_check_timeout_seconds = 0.2\nhealth_check_failures = 3\n"
        "idle_health_check_seconds = 0.4\n"
        + hostile_model("m", tmp_path, tiny_model, "--health-503-after", "1")
    )
    server = servers.start(config)
    async with connect(server.address) as client:
        ready = await client.ready("m")
        await eventually_async(lambda: model_state(client, "m"), pb.MODEL_STATE_FAILED, seconds=8)
        await eventually(lambda: is_gone(ready.pid), 5, "the hung backend to be killed")


async def test_idle_unload_racing_requests_and_pins_never_fails_a_request(
    servers: ServerFactory, tiny_model: Path
) -> None:
    server = servers.start("[pool]\nidle_unload_seconds = 1\n" + fake_model("m", tiny_model))
    async with connect(server.address) as client:
        await client.ready("m")
        for round_ in range(4):
            [model] = (await pool_status(client)).models
            assert model.HasField("idle_unload_at")
            fires_at = model.idle_unload_at.ToDatetime().timestamp()
            # Aim at the expiry: requests and a Pin just before, at and after it.
            wait = fires_at - time.time() - 0.03 + 0.02 * round_
            await asyncio.sleep(max(0.0, wait))
            calls = [complete(client, "m", 2, prompt=f"r{round_}{i}") for i in range(3)]
            pin = client.control.Pin(pb.PinRequest(model="m", pinned=False))
            results = await asyncio.gather(*(read_all(c) for c in calls), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, [
                (e.code(), error_info(e).reason) for e in errors if isinstance(e, grpc.aio.AioRpcError)
            ]
            [pinned] = await asyncio.gather(pin, return_exceptions=True)
            if isinstance(pinned, grpc.aio.AioRpcError):
                assert error_info(pinned).reason == "MODEL_NOT_LOADED"
            await wait_streams(client, (0, 0))
            await eventually_async(lambda: model_state(client, "m"), pb.MODEL_STATE_READY)


async def test_unload_racing_crash_restarts_leaves_nothing_running_and_nothing_pinned(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    pid_log = tmp_path / "flaky.pids"
    config = (
        "[pool]\nrestart_backoff_seconds = 0.1\nrestart_backoff_max_seconds = 0.2\nmax_restarts = 1000\n"
        + fake_model("flaky", tiny_model, "--exit-after-seconds", "0.15", "--pid-log", str(pid_log))
    )
    server = servers.start(config + fake_model("marker", tiny_model))
    async with connect(server.address) as client:
        events = Events(client.control)
        for delay in (0.0, 0.05, 0.12, 0.2, 0.3, 0.45):
            [loaded] = await asyncio.gather(client.ready("flaky", pinned=True), return_exceptions=True)
            if isinstance(loaded, grpc.aio.AioRpcError):
                assert error_info(loaded).reason in ("BACKEND_START_FAILED", "LOAD_CANCELLED"), loaded
            await asyncio.sleep(delay)
            await client.control.Unload(pb.UnloadRequest(model="flaky"))

            async def empty() -> int | None:
                status = await pool_status(client)
                return None if status.models else status.sequence

            emptied = await poll(empty, 10, "the pool to be empty after Unload")
            started = len(pids_in(pid_log))
            # Issue 18 finding 12: a sleep of "several backoffs" passed trivially
            # under load. A restart is a timer of the server's loop, due at most
            # `restart_backoff_max_seconds` (0.2 s) after a crash that came before
            # the Unload; the marker's idle timer, armed after it, is due 1 s
            # later; timers fire in deadline order. So a restart that came back
            # would show on Watch before the marker's idle unload.
            await client.ready("marker", options=pb.LoadOptions(idle_unload_seconds=1))
            idle_unloaded = unloaded("marker", pb.UNLOAD_REASON_IDLE)
            _, idle = await events.wait_for(
                functools.partial(after, emptied, idle_unloaded), 10, "the marker's idle unload"
            )
            came_back = [
                m for m in events.messages() if emptied < m.sequence < idle.sequence and about(m, "flaky")
            ]
            assert not came_back, f"a restart came back after Unload (delay {delay}): {came_back}"
            assert len(pids_in(pid_log)) == started, f"a restart came back after Unload (delay {delay})"
            assert not (await pool_status(client)).models
            assert all(is_gone(pid) for pid in pids_in(pid_log))
        events.close()
    pins = server.state_dir / "pins.json"
    assert not pins.exists() or '"flaky"' not in pins.read_text()


def after(sequence: int, matches: Callable[[pb.WatchResponse], bool], message: pb.WatchResponse) -> bool:
    """Whether `message` comes after event `sequence` and `matches`."""
    return message.sequence > sequence and matches(message)


def about(message: pb.WatchResponse, model: str) -> bool:
    """Whether a Watch event (not a snapshot) concerns `model`."""
    kind = message.WhichOneof("event")
    if kind in (None, "snapshot"):
        return False
    event = getattr(message, kind)
    names = {getattr(event, "model", None), *getattr(event, "models", ())}
    if "status" in event.DESCRIPTOR.fields_by_name:
        names.add(event.status.name)
    return model in names


# ------------------------------------------- (c) the memory-pressure watcher


class BudgetMemory:
    """A host with `budget` bytes for backends: available = budget - their RSS (every model in Status).

    After `freeze`, each backend counts with the RSS it had then: a backend's
    own growth (a Python process warming up on a loaded machine) is not
    memory pressure the test meant (issue 18 finding 12).
    """

    def __init__(self, pool_views: Callable[[], Iterator[ModelView]]) -> None:
        self.budget = 64 << 30
        self.views = pool_views
        self.checks = 0  # how often the pool read it
        self.frozen: dict[str, int] = {}

    def freeze(self) -> int:
        """Count each backend with its RSS now from here on; return their sum."""
        self.frozen = {view.name: view.rss_bytes for view in self.views()}
        return sum(self.frozen.values())

    def total_bytes(self) -> int:
        return 64 << 30

    def available_bytes(self) -> int:
        self.checks += 1
        return self.budget - sum(self.frozen.get(view.name, view.rss_bytes) for view in self.views())


async def test_memory_pressure_stops_only_what_brings_memory_back_above_the_reserve(
    tmp_path: Path, tiny_model: Path
) -> None:
    names = ["a", "b", "c"]
    catalog = {
        name: ModelSpec(
            name=name,
            recipe=Recipe.COMMAND,
            path=tiny_model,
            type=ModelType.LLM,
            defaults=EffectiveOptions(ctx_size=256, idle_unload_seconds=None, backend_args=()),
            command=(sys.executable, str(FAKE_BACKEND), "--port", "{port}", "--model", "{path}"),
        )
        for name in names
    }
    reserve_mib = 100
    memory = BudgetMemory(lambda: pool.views())
    pool = Pool(
        catalog,
        PoolSettings(
            max_loaded={ModelType.LLM: 3},
            memory_reserve_mb=reserve_mib,
            memory_check_seconds=0.05,
            health_check_seconds=0,
            evict_grace_seconds=60,  # busy victims keep their memory this long: past the checks below
        ),
        launcher(tmp_path / "logs"),
        memory=memory,
        estimate=lambda spec, options: 1,
    )
    subscription = pool.bus.subscribe()
    pool.start(restore=False)
    try:
        for name in names:
            await pool.load(name, RequestedOptions(), None).outcome()
        async with contextlib.AsyncExitStack() as leases:
            for name in names:
                await leases.enter_async_context(pool.lease(name))
            # Memory falls 1 MiB below the reserve: stopping any one backend is enough.
            # Each backend's RSS as sampled once it has started up (a sample may
            # predate it): more than the 1 MiB that stopping any one must free.
            await eventually(
                lambda: min(view.rss_bytes for view in pool.views()) > 2 << 20, 10, "warm RSS samples"
            )
            used = memory.freeze()
            memory.budget = used + (reserve_mib << 20) - (1 << 20)

            def stopping() -> list[str]:
                return [v.name for v in pool.views() if v.state is ModelState.UNLOADING]

            await eventually(lambda: bool(stopping()), 5, "memory pressure to stop a model")
            victims = stopping()
            # Ten more checks while the victim still holds its memory (issue 18
            # finding 12: counted, where a sleep let a loaded machine run none).
            checks = memory.checks
            await eventually(lambda: memory.checks >= checks + 10, 10, "ten more memory checks")
            assert stopping() == victims, "the victim let go of its memory before the checks ran"
            chosen = [
                e.event.model
                for e in subscription.drain()
                if isinstance(e.event, ModelStateChanged) and e.event.state is ModelState.UNLOADING
            ]
            assert len(chosen) == 1, (
                f"memory 1 MiB short of the reserve stopped {chosen}: the watcher does not count the"
                " memory that models already being stopped will give back"
            )
    finally:
        subscription.close()
        await shut_down(pool)


async def test_an_unloaded_stream_ends_model_evicted_at_the_end_of_its_grace_not_of_the_stop(
    servers: ServerFactory, tiny_model: Path
) -> None:
    # The backend takes its time to exit: it ignores SIGTERM, and nothing but
    # this test kills it before stop_grace_seconds (60 s). The stream's grace is
    # evict_grace_seconds all the same: it ends while the backend still runs
    # (issue 18 finding 12: was `ended < 2.0` s, a duration).
    config = "[pool]\nevict_grace_seconds = 0.5\nstop_grace_seconds = 60\n" + fake_model(
        "m", tiny_model, "--ignore-sigterm", "--token-seconds", "0.02"
    )
    server = servers.start(config)
    async with connect(server.address) as client:
        pid = (await client.ready("m")).pid
        call = complete(client, "m", 100_000)
        await next_message(call)
        unload = asyncio.ensure_future(client.control.Unload(pb.UnloadRequest(model="m")))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await read_all(call)
        backend_ran_on = not is_gone(pid)
        os.kill(pid, signal.SIGKILL)  # the stop's grace need not run out
        await unload
    assert error_info(raised.value).reason == "MODEL_EVICTED"
    assert backend_ran_on, "the stream ended only with its backend: revoking a lease does not stop its stream"


async def test_a_reload_mid_stream_ends_the_stream_model_evicted_and_the_new_process_serves(
    servers: ServerFactory, tiny_model: Path
) -> None:
    config = "[pool]\nevict_grace_seconds = 0.3\nidle_unload_seconds = 60\n" + fake_model(
        "m", tiny_model, "--token-seconds", "0.02"
    )
    server = servers.start(config)
    async with connect(server.address) as client:
        old = await client.ready("m")
        call = complete(client, "m", 100_000)
        await next_message(call)
        new = await client.ready("m", options=pb.LoadOptions(ctx_size=512))
        assert new.pid != old.pid
        assert await failure(call) == (grpc.StatusCode.ABORTED, "MODEL_EVICTED")
        await wait_streams(client, (0, 0))
        chunks = await read_all(complete(client, "m", 2))
        assert chunks[-1].usage.completion_tokens == 2
        [model] = (await pool_status(client)).models
        assert model.pid == new.pid
        assert model.in_flight == 0
        assert model.HasField("idle_unload_at")
        await eventually(lambda: is_gone(old.pid), 5, "the old process to exit")
