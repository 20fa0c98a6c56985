"""Plan (a dry-run Load): for each outcome, what the plan says is what the load then does.

In process, real backend processes (the fake backend), the host's memory
simulated (a fixed figure the test sets). Each test asks `Pool.plan`, then
runs the same `Pool.load`, and compares; the last one does it over gRPC.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from conftest import ServerFactory, connect, fake_model, fake_spec, launcher, shut_down
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.core.catalog import ModelType
from lemonade_grpc.core.errors import InsufficientMemory, LemonadeError, SlotsPinned
from lemonade_grpc.core.options import RequestedOptions
from lemonade_grpc.core.settings import PoolSettings
from lemonade_grpc.pool.events import ModelUnloaded, UnloadReason
from lemonade_grpc.pool.forecast import LoadForecast, Outcome
from lemonade_grpc.pool.pool import Pool
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
