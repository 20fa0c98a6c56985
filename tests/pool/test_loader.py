"""The load path: one process per model whatever the concurrency, the queue, reloads, and Plan.

Plan (a dry-run Load): for each outcome, what the plan says is what the load
then does. In process, real backend processes (the fake backend), the host's
memory simulated (a fixed figure the test sets); each of those tests asks
`Pool.plan`, then runs the same `Pool.load`, and compares; one does it over
gRPC. The rules (DESIGN.md items 1-3), each pinned by the bug it comes from,
run a real server: fake backends write their pid to a log when they start,
so "how many processes ever existed" is the operating system's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from conftest import (
    ServerFactory,
    alive,
    connect,
    eventually,
    fake_model,
    fake_spec,
    launcher,
    next_message,
    pids_in,
    poll,
    read_all,
    shut_down,
)
from lemonade_grpc._gen.lemonade.v1 import inference_pb2
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.core.catalog import ModelType
from lemonade_grpc.core.errors import InsufficientMemory, LemonadeError, SlotsPinned
from lemonade_grpc.core.options import RequestedOptions
from lemonade_grpc.core.settings import PoolSettings
from lemonade_grpc.pool.events import ModelUnloaded, UnloadReason
from lemonade_grpc.pool.forecast import LoadForecast, Outcome
from lemonade_grpc.pool.pool import Pool
from lemonade_grpc.testing import is_gone
from over_grpc import eventually_async, model_state, pool_status
from rpc_errors import error_info

MIB = 1 << 20
GIB = 1 << 30
RESERVE = 100 * MIB


class Memory:
    def __init__(self) -> None:
        self.available = 64 * GIB

    def total_bytes(self) -> int:
        return 64 * GIB

    def available_bytes(self) -> int:
        return self.available


PoolMaker = Callable[..., tuple[Pool, Memory]]


@pytest.fixture
async def make_pool(tmp_path: Path, tiny_model: Path) -> AsyncIterator[PoolMaker]:
    pools: list[Pool] = []

    def make(needs: dict[str, int], slots: int) -> tuple[Pool, Memory]:
        memory = Memory()
        pool = Pool(
            {name: fake_spec(name, tiny_model) for name in needs},
            PoolSettings(
                max_loaded={ModelType.LLM: slots}, memory_reserve_mb=RESERVE // MIB, evict_grace_seconds=0
            ),
            launcher(tmp_path / "logs"),
            memory=memory,
            estimate=lambda spec, options: needs[spec.name],
        )
        pools.append(pool)
        return pool, memory

    yield make
    await shut_down(*pools)


async def plan_then_load(
    pool: Pool, name: str, requested: RequestedOptions | None = None, pinned: bool | None = None
) -> tuple[LoadForecast, list[tuple[str, UnloadReason]], bool, LemonadeError | None]:
    """The plan, then what the load did: (plan, models it stopped and why, already_loaded, its error)."""
    requested = requested or RequestedOptions()
    told = await pool.plan(name, requested, pinned)
    before = {view.name: view.pid for view in pool.views()}
    started = pool.snapshot().backends_started
    subscription = pool.bus.subscribe()
    try:
        result = await pool.load(name, requested, pinned).outcome()
    except LemonadeError as error:
        return told, [], False, error
    stopped = [
        (envelope.event.model, envelope.event.reason)
        for envelope in subscription.drain()
        if isinstance(envelope.event, ModelUnloaded) and envelope.event.model != name
    ]
    subscription.close()
    assert (pool.snapshot().backends_started > started) == (told.outcome is Outcome.LOAD)
    assert told.reload == (name in before and told.outcome is Outcome.LOAD)
    return told, stopped, result.already_loaded, None


# ------------------------------------------------------------- Plan against Load, for each outcome


async def test_already_loaded(make_pool: PoolMaker) -> None:
    pool, _ = make_pool({"a": MIB}, slots=1)
    await pool.load("a", RequestedOptions()).outcome()
    told, stopped, already, error = await plan_then_load(pool, "a")
    assert told.outcome is Outcome.ALREADY_LOADED
    assert (stopped, already, error) == ([], True, None)


async def test_reuse_keeps_the_process(make_pool: PoolMaker) -> None:
    pool, _ = make_pool({"a": MIB}, slots=1)
    await pool.load("a", RequestedOptions()).outcome()
    pid = pool.snapshot().models[0].pid
    told, stopped, already, error = await plan_then_load(
        pool, "a", RequestedOptions(idle_unload_seconds=60), True
    )
    assert told.outcome is Outcome.REUSE
    assert (stopped, already, error) == ([], True, None)
    assert pool.snapshot().models[0].pid == pid


async def test_a_load_that_fits(make_pool: PoolMaker) -> None:
    pool, memory = make_pool({"a": MIB, "b": 300 * MIB}, slots=2)
    memory.available = GIB
    told, stopped, already, error = await plan_then_load(pool, "b")
    assert told.outcome is Outcome.LOAD
    assert (told.evictions, told.need_bytes, told.available_bytes) == ((), 300 * MIB, GIB)
    assert (stopped, already, error) == ([], False, None)


async def test_a_reload_with_other_options(make_pool: PoolMaker) -> None:
    pool, _ = make_pool({"a": MIB}, slots=1)
    await pool.load("a", RequestedOptions()).outcome()
    told, _, already, error = await plan_then_load(pool, "a", RequestedOptions(ctx_size=512))
    assert (told.outcome, told.reload, told.options.ctx_size) == (Outcome.LOAD, True, 512)
    assert (already, error) == (False, None)


async def test_an_eviction_for_a_slot(make_pool: PoolMaker) -> None:
    pool, _ = make_pool({"old": MIB, "a": MIB, "b": MIB}, slots=2)
    for name in ("old", "a"):
        await pool.load(name, RequestedOptions()).outcome()
    told, stopped, _, error = await plan_then_load(pool, "b")
    assert told.outcome is Outcome.LOAD
    assert told.evictions == (("old", UnloadReason.EVICTED_LRU),)
    assert (stopped, error) == (list(told.evictions), None)


async def test_an_eviction_for_memory(make_pool: PoolMaker) -> None:
    pool, memory = make_pool({"a": MIB, "big": GIB}, slots=2)
    await pool.load("a", RequestedOptions()).outcome()
    a_rss = pool.snapshot().models[0].rss_bytes
    # Enough only once `a` (idle, unpinned) is gone.
    memory.available = RESERVE + GIB - a_rss // 2
    told, stopped, _, error = await plan_then_load(pool, "big")
    assert told.outcome is Outcome.LOAD
    assert told.evictions == (("a", UnloadReason.MEMORY_PRESSURE),)
    assert (stopped, error) == (list(told.evictions), None)


async def test_slots_pinned(make_pool: PoolMaker) -> None:
    pool, _ = make_pool({"a": MIB, "b": MIB}, slots=1)
    await pool.load("a", RequestedOptions(), True).outcome()
    told, stopped, _, error = await plan_then_load(pool, "b")
    assert told.outcome is Outcome.SLOTS_PINNED
    assert isinstance(error, SlotsPinned)
    assert told.message == error.message
    assert stopped == []


async def test_insufficient_memory(make_pool: PoolMaker) -> None:
    pool, memory = make_pool({"a": MIB, "huge": 8 * GIB}, slots=2)
    await pool.load("a", RequestedOptions(), True).outcome()
    memory.available = GIB
    told, stopped, _, error = await plan_then_load(pool, "huge")
    assert told.outcome is Outcome.INSUFFICIENT_MEMORY
    assert isinstance(error, InsufficientMemory)
    assert told.message == error.message
    assert told.need_bytes == 8 * GIB
    assert stopped == []


async def test_plan_over_grpc_changes_nothing_and_refuses_what_load_refuses(
    servers: ServerFactory, tiny_model: Path
) -> None:
    server = servers.start(
        "[pool]\nmax_loaded = { llm = 1 }\n" + fake_model("a", tiny_model) + fake_model("b", tiny_model)
    )
    async with connect(server.address) as client:
        await client.ready("a", pinned=True)
        before = await client.control.Status(pb.StatusRequest())
        told = await client.control.Plan(pb.PlanRequest(model="b"))
        after = await client.control.Status(pb.StatusRequest())
        assert told.outcome == pb.PLAN_OUTCOME_SLOTS_PINNED
        assert "unpin one to load b" in told.message
        assert before.pool.backends_started == after.pool.backends_started
        assert [(m.name, m.pid, m.pinned) for m in before.pool.models] == [
            (m.name, m.pid, m.pinned) for m in after.pool.models
        ]
        unpinned = await client.control.Plan(pb.PlanRequest(model="b", pinned=False))
        assert unpinned.outcome == pb.PLAN_OUTCOME_SLOTS_PINNED  # b's pin does not free a's slot
        reload = await client.control.Plan(pb.PlanRequest(model="a", options=pb.LoadOptions(ctx_size=512)))
        assert (reload.outcome, reload.reload, reload.options.ctx_size) == (pb.PLAN_OUTCOME_LOAD, True, 512)
        for request, reason in [
            (pb.PlanRequest(model="nope"), "MODEL_NOT_FOUND"),
            (pb.PlanRequest(model="bad name"), "INVALID_REQUEST"),
            (pb.PlanRequest(model="a", options=pb.LoadOptions(ctx_size=0)), "INVALID_OPTIONS"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.control.Plan(request)
            assert error_info(refused.value).reason == reason


# --------------------------- the rules (DESIGN.md items 1-3), each pinned by the bug it comes from


async def test_fifty_concurrent_loads_start_one_process_unsloth_5161(
    servers: ServerFactory, tiny_model: Path, pid_log: Path
) -> None:
    config = fake_model("slow", tiny_model, "--load-seconds", "0.5", "--pid-log", str(pid_log))
    server = servers.start(config)
    async with connect(server.address) as client:
        streams = await asyncio.gather(*(client.load_all("slow") for _ in range(50)))
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


# --------------------------------------------------------------------------------- the Load stream


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
        small = asyncio.ensure_future(client.load_all("m", options=pb.LoadOptions(ctx_size=256)))
        await eventually_async(lambda: model_state(client, "m"), pb.MODEL_STATE_LOADING)
        big = await client.load_all("m", options=pb.LoadOptions(ctx_size=512))
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


# ------------------------------------------------------------------------------ issue 9 finding 20


async def test_waiters_count_the_clients_still_following_a_load(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    ready = tmp_path / "slow.ready"
    # The load ends when the test says (issue 18 finding 12: was 2 s, a window).
    server = servers.start(fake_model("slow", tiny_model, "--ready-file", str(ready)))
    async with connect(server.address) as client:
        calls = [client.control.Load(pb.LoadRequest(model="slow")) for _ in range(3)]
        for call in calls:
            await next_message(call)

        async def waiters() -> int:
            flight = (await client.control.Status(pb.StatusRequest())).pool.load_in_flight
            return flight.waiters

        await poll_until(waiters, 3)
        calls[0].cancel()
        calls[1].cancel()
        await poll_until(waiters, 1)
        ready.touch()
        assert (await read_all(calls[2]))[-1].phase == pb.LOAD_PHASE_READY


async def poll_until(read: object, wanted: int, seconds: float = 5.0) -> None:
    assert callable(read)
    deadline = asyncio.get_running_loop().time() + seconds
    while (value := await read()) != wanted:
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"expected {wanted}, still {value} after {seconds:g} s")
        await asyncio.sleep(0.02)
