"""The pool as a whole: properties and storms that keep every promise, and issue 9 findings 15-17.

The property test and the findings run the Pool in process with real backend
processes (tests/fake_backend.py through the command recipe); memory figures
and the memory estimate are injected where a test needs them. Each model's
backend writes its pid to its own log, so "one process per model" and "no
more processes than slots" are checked against the operating system, not
against our own bookkeeping.

Hypothesis generates rounds of concurrent operations (Load with options and
pins, Unload of one model or all, Pin, inference streams), each started after
a random delay and abandoned by its client after a random time or never (a
cancel, a short deadline, lesson 9). While they run, a sampler checks the
process table every few milliseconds; after each round, at quiescence, it
checks that no model is transitional, every live backend is in Status, and
the pins on disk are the pins in memory. The storms do the like over gRPC
against a real server, with a crashing pinned model and memory pressure.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import (
    FAKE_BACKEND,
    Client,
    Events,
    ProcessSampler,
    ServerFactory,
    alive,
    connect,
    eventually,
    fake_model,
    fake_spec,
    launcher,
    pids_in,
    poll,
    shut_down,
)
from lemonade_grpc._gen.lemonade.v1 import inference_pb2
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.backends.http import BackendConnectionError
from lemonade_grpc.core.catalog import ModelSpec, ModelType, Recipe
from lemonade_grpc.core.errors import (
    InsufficientMemory,
    InternalError,
    LemonadeError,
    ModelNotLoaded,
    Overloaded,
    ServerResourcesExhausted,
)
from lemonade_grpc.core.options import EffectiveOptions, RequestedOptions
from lemonade_grpc.core.settings import Limits, PoolSettings
from lemonade_grpc.pool.events import ModelUnloaded, PoolWarning, UnloadReason
from lemonade_grpc.pool.model import ModelState
from lemonade_grpc.pool.pool import MemoryEstimator, Pool
from lemonade_grpc.store.pin_file import PinFile
from lemonade_grpc.testing import is_gone
from over_grpc import saved_pins
from rpc_errors import error_info

GIB = 1 << 30


class FixedMemory:
    """A host whose available memory the test sets."""

    def __init__(self, available: int) -> None:
        self.available = available

    def total_bytes(self) -> int:
        return 64 * GIB

    def available_bytes(self) -> int:
        return self.available


PoolMaker = Callable[[dict[str, ModelSpec], MemoryEstimator, FixedMemory], Pool]


@pytest.fixture
async def make_pool(tmp_path: Path) -> AsyncIterator[PoolMaker]:
    pools: list[Pool] = []

    def make(catalog: dict[str, ModelSpec], estimate: MemoryEstimator, memory: FixedMemory) -> Pool:
        pool = Pool(
            catalog,
            PoolSettings(
                max_loaded={ModelType.LLM: 2},
                memory_reserve_mb=0,
                memory_check_seconds=0,
                health_check_seconds=0,
                evict_grace_seconds=0,
                stop_grace_seconds=1.5,
            ),
            launcher(tmp_path / "logs"),
            memory=memory,
            estimate=estimate,
            pin_file=PinFile(tmp_path / "pins.json"),
        )
        pools.append(pool)
        return pool

    yield make
    await shut_down(*pools)


async def test_a_model_chosen_for_eviction_cannot_be_pinned_meanwhile_issue_9_finding_15(
    make_pool: PoolMaker, tiny_model: Path, tmp_path: Path
) -> None:
    # x is the slot victim and is slow to stop (it ignores SIGTERM); y is the
    # memory victim. Before the fix, y stayed READY until x had stopped: a Pin
    # in between succeeded, was saved, and then the pinned y was evicted.
    memory = FixedMemory(GIB)
    catalog = {
        "x": fake_spec("x", tiny_model, "--ignore-sigterm"),
        "y": fake_spec("y", tiny_model),
        "c": fake_spec("c", tiny_model),
    }
    pool = make_pool(catalog, lambda s, o: {"x": 1, "y": 1, "c": GIB + 1}[s.name], memory)
    for name in ("x", "y"):
        await pool.load(name, RequestedOptions()).outcome()
    y_view = pool.model_view("y")
    assert y_view is not None
    memory.available = GIB + 1 - pool.model_view("x").rss_bytes - 1  # type: ignore[union-attr]
    subscription = pool.bus.subscribe()
    load_c = asyncio.ensure_future(pool.load("c", RequestedOptions()).outcome())
    await eventually(
        lambda: (view := pool.model_view("x")) is not None and view.state is ModelState.UNLOADING,
        10,
        "x to be stopping",
    )
    # x is still stopping (its grace period): y must already be on its way out.
    with pytest.raises(ModelNotLoaded):
        await pool.pin("y", True)
    result = await load_c
    assert result.evicted == ("x", "y")
    unloaded = [e.event for e in subscription.drain() if isinstance(e.event, ModelUnloaded)]
    assert {(u.model, u.reason) for u in unloaded} == {
        ("x", UnloadReason.EVICTED_LRU),
        ("y", UnloadReason.MEMORY_PRESSURE),
    }
    assert is_gone(y_view.pid)
    saved, _ = PinFile(tmp_path / "pins.json").read()
    assert "y" not in saved


async def test_a_load_that_fails_unexpectedly_ends_and_leaves_nothing_issue_9_finding_16(
    make_pool: PoolMaker, tiny_model: Path
) -> None:
    broken = True

    def estimate(s: ModelSpec, o: EffectiveOptions) -> int:
        if broken:
            raise RuntimeError("a bug in the estimate")
        return 1

    pool = make_pool({"m": fake_spec("m", tiny_model)}, estimate, FixedMemory(GIB))
    job = pool.load("m", RequestedOptions())
    with pytest.raises(InternalError):
        await asyncio.wait_for(job.outcome(), 10)  # before the fix: waited forever
    view = pool.snapshot()
    assert view.load_in_flight is None
    assert view.queue == ()
    assert view.models == ()
    broken = False
    result = await pool.load("m", RequestedOptions()).outcome()
    assert result.model.state is ModelState.READY


async def test_a_reload_that_cannot_fit_keeps_the_working_model_issue_9_finding_17(
    make_pool: PoolMaker, tiny_model: Path
) -> None:
    memory = FixedMemory(GIB)
    pool = make_pool({"m": fake_spec("m", tiny_model)}, lambda s, o: o.ctx_size * 1024, memory)
    before = await pool.load("m", RequestedOptions()).outcome()
    memory.available = 100 << 20
    with pytest.raises(InsufficientMemory):
        # 4 GiB at 4 Mi tokens: more than the 100 MiB available plus what m frees.
        await pool.load("m", RequestedOptions(ctx_size=4 << 20)).outcome()
    after = pool.model_view("m")
    assert after is not None
    assert after.state is ModelState.READY
    assert (after.pid, after.options.ctx_size) == (before.model.pid, 256)


# --- issue 13's soak: a crashed pinned model's restart and a full load queue; Pin's reply -----


async def test_a_crashed_pinned_models_restart_is_queued_even_when_the_load_queue_is_full(
    tmp_path: Path, tiny_model: Path
) -> None:
    catalog = {
        "a": fake_spec("a", tiny_model),
        "slow": fake_spec("slow", tiny_model, "--load-seconds", "3"),
        "c": fake_spec("c", tiny_model),
    }
    pool = Pool(
        catalog,
        PoolSettings(
            max_loaded={ModelType.LLM: 3},
            memory_reserve_mb=0,
            memory_check_seconds=0,
            restart_backoff_seconds=0.01,
        ),
        launcher(tmp_path / "logs"),
        limits=Limits(max_queued_loads=1),
        estimate=lambda spec, options: 1,
    )
    pool.start(restore=False)
    events = pool.bus.subscribe()
    try:
        first = (await pool.load("a", RequestedOptions(), pinned=True).outcome()).model
        slow = pool.load("slow", RequestedOptions())  # holds the load lock for 3 s
        await eventually(lambda: running_load(pool) == "slow", 10, "the slow load to run")
        queued = pool.load("c", RequestedOptions())  # the one place in the queue
        with pytest.raises(Overloaded):
            pool.load("c", RequestedOptions(ctx_size=512))  # full, for a client
        os.kill(first.pid, signal.SIGKILL)
        await eventually(
            lambda: (
                (view := pool.model_view("a")) is not None
                and view.state is ModelState.READY
                and view.pid != first.pid
            ),
            30,
            "the pinned model restarted",
        )
        view = pool.model_view("a")
        assert view is not None
        assert view.pinned
        warnings = [e.event.code for e in events.drain() if isinstance(e.event, PoolWarning)]
        assert "RESTART_FAILED" not in warnings, warnings
        await slow.outcome()
        await queued.outcome()
    finally:
        events.close()
        await shut_down(pool)
    assert is_gone(first.pid)


def running_load(pool: Pool) -> str | None:
    load = pool.snapshot().load_in_flight
    return load.model if load is not None else None


async def test_pins_reply_is_the_model_as_that_pin_left_it(make_pool: PoolMaker, tiny_model: Path) -> None:
    pool = make_pool({"a": fake_spec("a", tiny_model)}, lambda spec, options: 1, FixedMemory(GIB))
    await pool.load("a", RequestedOptions()).outcome()
    # Both set the pin before either's file write is done.
    pinned, unpinned = await asyncio.gather(pool.pin("a", True), pool.pin("a", False))
    assert (pinned.pinned, unpinned.pinned) == (True, False)


# --- issue 18 finding 5: out of descriptors, a load is RESOURCE_EXHAUSTED, never INTERNAL ------------


class NoDescriptors(FixedMemory):
    """A host probe that fails as /proc/meminfo's read did with every descriptor taken."""

    def available_bytes(self) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


async def test_finding_5_out_of_descriptors_a_load_and_an_auto_load_are_server_resources_exhausted(
    make_pool: PoolMaker, tiny_model: Path
) -> None:
    pool = make_pool({"m": fake_spec("m", tiny_model)}, lambda spec, options: 0, NoDescriptors(GIB))
    with pytest.raises(ServerResourcesExhausted) as loaded:
        await pool.load("m", RequestedOptions()).outcome()
    with pytest.raises(ServerResourcesExhausted) as leased:
        async with pool.lease("m"):
            pass
    for raised in (loaded, leased):
        assert raised.value.reason == "SERVER_RESOURCES_EXHAUSTED"
        assert "Too many open files" in raised.value.message
    assert pool.model_view("m") is None  # nothing was started


# ------------------------------------- the property: whatever clients do, and however they give up


MODELS = ("m0", "m1", "m2")

model = st.sampled_from(MODELS)


# When the client gives up: never, or after this many seconds (0: at once).
give_up = st.sampled_from([None, None, None, 0.0, 0.005, 0.05, 0.3])
start_delay = st.sampled_from([0.0, 0.0, 0.01, 0.05, 0.15])
load_op = st.tuples(
    st.just("load"), model, st.sampled_from([None, None, 512, 1024]), st.sampled_from([None, True, False])
)
unload_op = st.tuples(st.just("unload"), st.sampled_from((*MODELS, "")))
pin_op = st.tuples(st.just("pin"), model, st.booleans())
stream_op = st.tuples(st.just("stream"), model, st.sampled_from([3, 40, 100]))
operation = st.tuples(
    st.one_of(load_op, load_op, pin_op, unload_op, stream_op, stream_op), start_delay, give_up
)
rounds = st.lists(st.lists(operation, min_size=1, max_size=6), min_size=1, max_size=3)


def catalog(tmp: Path, model_file: Path) -> dict[str, ModelSpec]:
    return {
        name: ModelSpec(
            name=name,
            recipe=Recipe.COMMAND,
            path=model_file,
            type=ModelType.LLM,
            defaults=EffectiveOptions(ctx_size=256, idle_unload_seconds=None, backend_args=()),
            command=(
                *(sys.executable, str(FAKE_BACKEND), "--port", "{port}", "--model", "{path}"),
                *("--pid-log", str(tmp / f"{name}.pids"), "--token-seconds", "0.005"),
            ),
        )
        for name in MODELS
    }


class Sampler:
    """Checks the process table every few milliseconds while operations run."""

    def __init__(self, tmp: Path, slots: int) -> None:
        self.tmp = tmp
        self.slots = slots
        self.samples = 0
        self.violations: list[str] = []

    def live(self) -> dict[str, list[int]]:
        return {name: [p for p in pids_in(self.tmp / f"{name}.pids") if not is_gone(p)] for name in MODELS}

    async def run(self) -> None:
        while True:
            live = self.live()
            self.samples += 1
            if any(len(pids) > 1 for pids in live.values()):
                self.violations.append(f"two processes for one model: {live}")
            if sum(len(pids) for pids in live.values()) > self.slots:
                self.violations.append(f"more processes than slots: {live}")
            await asyncio.sleep(0.003)


class Errors(logging.Handler):
    """Collects the pool's error log lines (a background task that died, say)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def client(pool: Pool, op: tuple[Any, ...], delay: float, patience: float | None) -> None:
    """One client doing `op`, giving up after `patience` seconds (None: waits to the end)."""
    await asyncio.sleep(delay)
    work: Awaitable[Any]
    match op:
        case ("load", str(name), ctx, pinned):
            work = pool.load(name, RequestedOptions(ctx_size=ctx), pinned).outcome()
        case ("unload", str(name)):
            # As the Unload RPC does: the unload is the pool's, the client only waits.
            work = asyncio.shield(pool.unload(name))
        case ("pin", str(name), bool(pinned)):
            work = pool.pin(name, pinned)
        case ("stream", str(name), int(tokens)):
            work = stream(pool, name, tokens)
        case _:
            raise AssertionError(op)
    try:
        if patience is None:
            await work
        else:
            await asyncio.wait_for(work, patience)
    except TimeoutError:
        pass  # the client gave up: cancelled its call
    except InternalError:
        raise
    except LemonadeError:
        pass  # refused or ended with a reason (SLOTS_PINNED, MODEL_EVICTED, LOAD_CANCELLED ...)


async def stream(pool: Pool, name: str, tokens: int) -> None:
    async with pool.lease(name) as lease:
        try:
            async for _ in lease.backend.client.stream(
                "/v1/completions", {"prompt": "p", "max_tokens": tokens}
            ):
                pass
        except BackendConnectionError:
            # The pool broke the stream (eviction after the grace period):
            # it says why, as the Inference servicer reports it.
            assert lease.revoked is not None, "a stream broke without a reason"


async def quiescent(pool: Pool, seconds: float = 20.0) -> None:
    """Wait until no load runs or waits and no model is transitional; fail after `seconds`."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        view = pool.snapshot()
        states = {m.name: m.state for m in view.models}
        if (
            view.load_in_flight is None
            and not view.queue
            and all(s in (ModelState.READY, ModelState.FAILED) for s in states.values())
        ):
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not quiescent after {seconds:g} s: {states}, queue {view.queue}")
        await asyncio.sleep(0.01)


async def check_at_rest(pool: Pool, sampler: Sampler, store: PinFile) -> None:
    await quiescent(pool)
    await pool._pins.flush()
    views = {v.name: v for v in pool.views()}
    assert all(v.state is ModelState.READY for v in views.values()), views
    # Every live backend is in Status, and Status names no dead one.
    live = {name: pids for name, pids in sampler.live().items() if pids}
    assert live == {name: [v.pid] for name, v in views.items()}, (live, views)
    saved, problem = store.read()
    assert problem is None
    assert saved == {v.name: v.options for v in views.values() if v.pinned}


async def run(ops_rounds: list[list[tuple[Any, ...]]], slots: int, tmp: Path, model_file: Path) -> None:
    for name in MODELS:
        (tmp / f"{name}.pids").unlink(missing_ok=True)
    store = PinFile(tmp / "pins.json")
    store.path.unlink(missing_ok=True)
    pool = Pool(
        catalog(tmp, model_file),
        PoolSettings(
            max_loaded={ModelType.LLM: slots},
            stop_grace_seconds=2,
            # Streams of 40 and 100 tokens run 0.2 and 0.5 s: evictions both
            # wait for some and revoke others.
            evict_grace_seconds=0.3,
            health_check_seconds=0,
            memory_check_seconds=0,
        ),
        launcher(tmp / "logs"),
        pin_file=store,
    )
    errors = Errors()
    logging.getLogger("lemonade_grpc").addHandler(errors)
    sampler = Sampler(tmp, slots)
    sampling = asyncio.create_task(sampler.run())
    try:
        for ops in ops_rounds:
            clients = asyncio.gather(*(client(pool, op, delay, patience) for op, delay, patience in ops))
            try:
                # Every client ends: a stream or load never hangs (the fake
                # backends need well under a second for any of these).
                await asyncio.wait_for(clients, 30)
            except TimeoutError:
                raise AssertionError(f"clients still waiting after 30 s: {pool.snapshot()}") from None
            await check_at_rest(pool, sampler, store)
    finally:
        await pool.shutdown()
        sampling.cancel()
        logging.getLogger("lemonade_grpc").removeHandler(errors)
    assert not sampler.violations, sampler.violations[:3]
    assert not errors.records, [r.getMessage() for r in errors.records]
    assert all(not pids for pids in sampler.live().values()), "a backend outlived the pool"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops_rounds=rounds, slots=st.sampled_from([1, 2]))
def test_pool_promises_hold_whatever_clients_do_and_however_they_give_up(
    ops_rounds: list[list[tuple[Any, ...]]], slots: int, tmp_path: Path, tiny_model: Path
) -> None:
    asyncio.run(run(ops_rounds, slots, tmp_path, tiny_model))


async def at_rest(client: Client, logs: list[Path]) -> tuple[pb.PoolStatus, list[int], list[int]]:
    """The pool once nothing is loading, queued or stopping and the live backends are the ones it shows.

    With the live pids and Status's. A crashed backend is killed just after its model goes FAILED,
    so the two may differ for a moment; they must agree within the deadline.
    """

    async def settled() -> tuple[pb.PoolStatus, list[int], list[int]] | None:
        pool = (await client.control.Status(pb.StatusRequest())).pool
        busy = pool.load_in_flight.model or pool.queue
        if busy or any(m.state in (pb.MODEL_STATE_LOADING, pb.MODEL_STATE_UNLOADING) for m in pool.models):
            return None
        live = sorted(alive([pid for log in logs for pid in pids_in(log)]))
        in_status = sorted(m.pid for m in pool.models if m.pid)
        return (pool, live, in_status) if live == in_status else None

    return await poll(settled, 15, "the pool at rest, its live backends the ones Status shows")


# ------------------------------------------------------- races through the gRPC server


def pid_logs(tmp_path: Path, *names: str) -> list[Path]:
    return [tmp_path / f"{name}.pids" for name in names]


def check_error(error: grpc.aio.AioRpcError, problems: list[str], what: str) -> None:
    """A client-side end (deadline, cancel) needs no reason; any other status needs an ErrorInfo."""
    code = error.code()
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        problems.append(f"{what}: {code.name} {error.details()}")
        return
    try:
        error_info(error)
    except AssertionError as missing:
        problems.append(f"{what}: {code.name} without ErrorInfo ({missing})")


async def storm_op(client: Client, rng: random.Random, names: tuple[str, ...], problems: list[str]) -> None:
    name = rng.choice(names)
    timeout = rng.uniform(0.005, 1.0)
    kind = rng.choice(["load", "load", "unload", "pin", "complete", "complete", "cancel-load"])
    what = f"{kind} {name} (timeout {timeout:.3f})"
    try:
        if kind in ("load", "cancel-load"):
            fields: dict[str, object] = {}
            if rng.random() < 0.7:
                fields["options"] = pb.LoadOptions(ctx_size=rng.choice([512, 1024]))
            if rng.random() < 0.4:
                fields["pinned"] = rng.random() < 0.5
            call = client.control.Load(pb.LoadRequest(model=name, **fields), timeout=timeout)  # type: ignore[arg-type]
            if kind == "cancel-load":
                await asyncio.sleep(rng.uniform(0.005, 0.3))
                call.cancel()
            else:
                async for _ in call:
                    pass
        elif kind == "unload":
            target = rng.choice([name, ""])
            await client.control.Unload(pb.UnloadRequest(model=target), timeout=timeout)
        elif kind == "pin":
            await client.control.Pin(pb.PinRequest(model=name, pinned=rng.random() < 0.5), timeout=timeout)
        else:
            request = inference_pb2.CompleteRequest(model=name, prompt="x", max_tokens=rng.randint(1, 30))
            async for _ in client.inference.Complete(request, timeout=timeout):
                pass
    except grpc.aio.AioRpcError as error:
        check_error(error, problems, what)
    except asyncio.CancelledError:
        pass


STORM_CONFIG = (
    "[pool]\nmax_loaded = {{ llm = 1 }}\nevict_grace_seconds = 0.2\nstop_grace_seconds = 1\n"
    "idle_unload_seconds = 1\n"
)


@pytest.mark.parametrize("seed", [1, 2])
async def test_random_loads_unloads_pins_and_streams_with_deadlines_keep_the_pool_consistent(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path, seed: int
) -> None:
    """One slot, two models; clients give up at random points. Promised invariants hold.

    Sampled all along: live processes (OS, pid logs) <= slots. At rest: no
    model LOADING or UNLOADING, every live backend in Status, pins.json is
    the pins in Status, every error had an ErrorInfo and none was UNKNOWN or INTERNAL.
    """
    logs = pid_logs(tmp_path, "a", "b")
    config = STORM_CONFIG.format() + "".join(
        fake_model(n, tiny_model, "--load-seconds", "0.1", "--token-seconds", "0.02", "--pid-log", str(log))
        for n, log in zip(("a", "b"), logs, strict=True)
    )
    server = servers.start(config)
    rng = random.Random(seed)
    problems: list[str] = []

    async with connect(server.address) as client:
        sampler = ProcessSampler(*logs)

        async def worker(worker_rng: random.Random) -> None:
            end = time.monotonic() + 6
            while time.monotonic() < end:
                await storm_op(client, worker_rng, ("a", "b"), problems)

        await asyncio.gather(*(worker(random.Random(rng.random())) for _ in range(6)))

        pool, live, in_status = await at_rest(client, logs)
        most = sampler.stop()
        pinned_in_status = {m.name: m.options.ctx_size for m in pool.models if m.pinned}
    assert problems == []
    assert most <= 1, f"{most} live backends with one slot"
    assert live == in_status, f"live backends {live}, Status {in_status}"
    on_disk = {name: options.ctx_size for name, options in saved_pins(server.state_dir).items()}
    assert on_disk == pinned_in_status


async def test_storm_with_a_crashing_pinned_model_and_memory_pressure_keeps_the_pool_consistent(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    """Two slots, three models: one pinned that crashes 0.4 s after each start (restarted with a short
    backoff), and a memory reserve just below what is free, so that loads evict for memory
    and the periodic check evicts under pressure while clients load, unload, pin and stream.
    """
    logs = pid_logs(tmp_path, "a", "b", "c")
    reserve = (psutil.virtual_memory().available >> 20) - 75
    config = (
        f"[pool]\nmax_loaded = {{ llm = 2 }}\nevict_grace_seconds = 0.2\nstop_grace_seconds = 1\n"
        f"memory_reserve_mb = {reserve}\nmemory_check_seconds = 0.2\nrestart_backoff_seconds = 0.1\n"
        "restart_backoff_max_seconds = 0.2\nmax_restarts = 1000\n"
        + fake_model("a", tiny_model, "--token-seconds", "0.02", "--pid-log", str(logs[0]))
        + fake_model("b", tiny_model, "--token-seconds", "0.02", "--pid-log", str(logs[1]))
        + fake_model("c", tiny_model, "--exit-after-seconds", "0.4", "--pid-log", str(logs[2]))
    )
    server = servers.start(config)
    rng = random.Random(3)
    problems: list[str] = []

    async with connect(server.address) as client:
        events = Events(client.control)
        sampler = ProcessSampler(*logs)
        try:
            await client.load_all("c", pinned=True)
        except grpc.aio.AioRpcError as error:
            check_error(error, problems, "load c pinned")

        async def worker(worker_rng: random.Random) -> None:
            end = time.monotonic() + 7
            while time.monotonic() < end:
                await storm_op(client, worker_rng, ("a", "b"), problems)

        async def keep_c_pinned() -> None:
            end = time.monotonic() + 7
            while time.monotonic() < end:
                try:
                    await client.load_all("c", pinned=True)
                except grpc.aio.AioRpcError as error:
                    check_error(error, problems, "load c pinned")
                await asyncio.sleep(0.3)

        await asyncio.gather(keep_c_pinned(), *(worker(random.Random(rng.random())) for _ in range(4)))
        await client.control.Unload(pb.UnloadRequest(model="c"))  # stop the crash loop

        pool, live, in_status = await at_rest(client, logs)
        most = sampler.stop()
        pinned_in_status = {m.name: m.options.ctx_size for m in pool.models if m.pinned}
        events.close()
    reasons = {
        m.model_unloaded.reason for m in events.messages() if m.WhichOneof("event") == "model_unloaded"
    }
    assert problems == []
    assert most <= 2, f"{most} live backends with two slots"
    assert live == in_status, f"live backends {live}, Status {in_status}"
    on_disk = {name: options.ctx_size for name, options in saved_pins(server.state_dir).items()}
    assert on_disk == pinned_in_status
    assert pb.UNLOAD_REASON_CRASHED in reasons, "the crash and restart path was not exercised"
