"""Plan under attack (issue 12): hostile requests, plans during churn, a crashed model awaiting restart.

In process, real backend processes (the fake backend). What Plan says for
each ordinary outcome, against the load that follows, is in test_loader.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import psutil
import pytest

from conftest import eventually, fake_spec, launcher
from in_process import make_pool, state_of
from lemonade_grpc.core.catalog import ModelSpec, ModelType
from lemonade_grpc.core.errors import LemonadeError, Overloaded, SlotsPinned
from lemonade_grpc.core.options import RequestedOptions
from lemonade_grpc.core.settings import Limits, PoolSettings
from lemonade_grpc.pool.events import ModelUnloaded, UnloadReason
from lemonade_grpc.pool.forecast import Outcome
from lemonade_grpc.pool.model import ModelState
from lemonade_grpc.pool.pool import Pool

GIB = 1 << 30


def at_rest(pool: Pool) -> bool:
    """No load in flight or queued, no model on its way in or out.

    Issue 18 finding 12: what the tests waited for with short sleeps.
    """
    view = pool.snapshot()
    settled = all(m.state in (ModelState.READY, ModelState.FAILED) for m in view.models)
    return view.load_in_flight is None and not view.queue and settled


# --- Plan against Load --------------------------------------------------------------------------


async def test_plan_tells_the_overload_a_load_would_be_refused_with(
    tiny_model: Path, tmp_path: Path, pools: list[Pool]
) -> None:
    catalog = {
        "slow": fake_spec("slow", tiny_model, "--load-seconds", "3"),
        "b": fake_spec("b", tiny_model),
        "c": fake_spec("c", tiny_model),
    }
    pool = Pool(
        catalog,
        PoolSettings(max_loaded={ModelType.LLM: 3}, memory_reserve_mb=0, memory_check_seconds=0),
        launcher(tmp_path / "logs"),
        limits=Limits(max_queued_loads=1),
        estimate=lambda spec, options: 1,
    )
    pools.append(pool)
    first = pool.load("slow", RequestedOptions())
    await eventually(lambda: pool.snapshot().load_in_flight is not None, 5, "the slow load to run")
    queued = pool.load("b", RequestedOptions())
    try:
        # Was: the plan promised a start ("c would be started") that the Load refuses at once.
        with pytest.raises(Overloaded) as planned:
            await pool.plan("c", RequestedOptions())
        with pytest.raises(Overloaded) as loaded:
            pool.load("c", RequestedOptions())
        assert planned.value.message == loaded.value.message
        # A request the Load would join or answer at once is not refused.
        joining = await pool.plan("b", RequestedOptions())
        assert joining.outcome is Outcome.LOAD
    finally:
        pool.unload()
        await asyncio.gather(first.outcome(), queued.outcome(), return_exceptions=True)


class HeldMemory:
    """A host with `budget` bytes: available = budget less the RSS of the given processes while they live."""

    def __init__(self) -> None:
        self.budget = 16 * GIB
        self.holders: list[int] = []

    def total_bytes(self) -> int:
        return 64 * GIB

    def available_bytes(self) -> int:
        held = 0
        for pid in self.holders:
            with contextlib.suppress(psutil.Error):
                held += psutil.Process(pid).memory_info().rss
        return self.budget - held


async def test_plan_and_load_agree_while_a_stop_is_freeing_the_memory(
    tiny_model: Path, tmp_path: Path, pools: list[Pool]
) -> None:
    # `old` holds memory and takes 2 s to stop (it ignores SIGTERM); `big` fits once it is gone.
    catalog = {
        "old": fake_spec("old", tiny_model, "--ignore-sigterm"),
        "big": fake_spec("big", tiny_model),
    }
    memory = HeldMemory()
    needs = {"old": 1, "big": 8 * GIB}
    pool = Pool(
        catalog,
        PoolSettings(
            max_loaded={ModelType.LLM: 2},
            memory_reserve_mb=0,
            memory_check_seconds=0,
            stop_grace_seconds=2.0,
        ),
        launcher(tmp_path / "logs"),
        memory=memory,
        estimate=lambda spec, options: needs[spec.name],
    )
    pools.append(pool)
    old = await pool.load("old", RequestedOptions()).outcome()
    memory.holders.append(old.model.pid)
    # `big` fits only once `old`'s memory is back: more than is free now, less than that plus old's RSS.
    needs["big"] = memory.available_bytes() + old.model.rss_bytes // 2
    await eventually(lambda: at_rest(pool), 10, "the load's job to be no longer the one in flight")
    unloading = pool.unload("old")
    assert state_of(pool, "old") is ModelState.UNLOADING
    plan = await pool.plan("big", RequestedOptions())
    loaded = await pool.load("big", RequestedOptions()).outcome()  # waits for the stop, then fits
    await unloading
    assert loaded.model.state is ModelState.READY
    assert plan.loads_ahead == 0  # nothing said the plan might change
    assert plan.outcome is Outcome.LOAD, (plan.outcome, plan.message)


HOSTILE: list[tuple[str, RequestedOptions, bool | None]] = [
    ("", RequestedOptions(), None),
    ("a b", RequestedOptions(), None),
    ("a\x00", RequestedOptions(), True),
    ("\x1b[31ma", RequestedOptions(), None),
    ("a" * 5000, RequestedOptions(), None),
    ("../a", RequestedOptions(), None),
    ("nope", RequestedOptions(), False),
    ("a", RequestedOptions(ctx_size=0), None),
    ("a", RequestedOptions(ctx_size=-1), None),
    ("a", RequestedOptions(ctx_size=1 << 40), None),
    ("a", RequestedOptions(idle_unload_seconds=-5), None),
    ("a", RequestedOptions(idle_unload_seconds=1 << 40), None),
    ("a", RequestedOptions(backend_args=("--port", "1")), None),
    ("a", RequestedOptions(backend_args=("--tools", "all")), None),
    ("a", RequestedOptions(backend_args=("--temp=1", "--tools=all")), None),
    ("a", RequestedOptions(backend_args=("1",)), None),
    ("a", RequestedOptions(backend_args=("--temp", "x\x00")), None),
    ("a", RequestedOptions(backend_args=("--temp",) * 10_000), None),
    ("a", RequestedOptions(backend_args=("--temp", "v" * 100_000)), None),
    ("a", RequestedOptions(backend_args=("--temp", "\ud800")), None),
]


async def test_plan_refuses_hostile_requests_exactly_as_load_does(
    tiny_model: Path, tmp_path: Path, pools: list[Pool]
) -> None:
    spec = fake_spec("a", tiny_model)
    spec = ModelSpec(
        **{**{f: getattr(spec, f) for f in spec.__slots__}, "allowed_args": frozenset({"--temp"})}
    )
    pool = make_pool(tmp_path, {"a": spec})
    pools.append(pool)
    for name, requested, pinned in HOSTILE:
        with pytest.raises(LemonadeError) as by_load:
            pool.load(name, requested, pinned)
        with pytest.raises(LemonadeError) as by_plan:
            await pool.plan(name, requested, pinned)
        assert (type(by_plan.value), by_plan.value.message) == (type(by_load.value), by_load.value.message)
    assert pool.snapshot().backends_started == 0


async def test_many_plans_during_loads_unloads_and_pins_change_nothing_and_never_fail(
    tiny_model: Path, tmp_path: Path, pools: list[Pool]
) -> None:
    names = ["a", "b", "c"]
    pool = make_pool(
        tmp_path,
        {name: fake_spec(name, tiny_model) for name in names},
        max_loaded={ModelType.LLM: 2},
        health_check_seconds=0,
        stop_grace_seconds=1.0,
    )
    pools.append(pool)
    unexpected: list[BaseException] = []
    stop = asyncio.Event()
    done = {"steps": 0, "plans": 0}

    async def churn() -> None:
        step = 0
        while not stop.is_set():
            name = names[step % 3]
            with contextlib.suppress(LemonadeError):
                if step % 4 == 3:
                    await pool.unload(name)
                elif step % 4 == 2:
                    await pool.pin(name, step % 8 == 2)
                else:
                    await pool.load(name, RequestedOptions(ctx_size=256 + 256 * (step % 2))).outcome()
            step += 1
            done["steps"] = step

    async def plans() -> int:
        count = 0
        while not stop.is_set():
            batch = [
                pool.plan(n, RequestedOptions(ctx_size=c), p)
                for n in names
                for c in (None, 256, 512)
                for p in (None, True, False)
            ]
            for result in await asyncio.gather(*batch, return_exceptions=True):
                if isinstance(result, BaseException) and not isinstance(result, LemonadeError):
                    unexpected.append(result)
            count += len(batch)
            done["plans"] = count
        return count

    churner = asyncio.create_task(churn())
    planner = asyncio.create_task(plans())
    # As much work as it takes, not as much as 5 s allow (issue 18 finding 12): six
    # rounds of loads, pins and unloads of every model, and 500 plans among them.
    await eventually(lambda: done["steps"] >= 24 and done["plans"] >= 500, 120, "the churn and the plans")
    stop.set()
    await churner
    count = await planner
    assert not unexpected, unexpected[:3]
    assert count >= 500
    # Settled: each plan now is what the load then does.
    await eventually(lambda: at_rest(pool), 10, "the pool at rest")
    for name in names:
        plan = await pool.plan(name, RequestedOptions())
        started = pool.snapshot().backends_started
        try:
            result = await pool.load(name, RequestedOptions()).outcome()
        except SlotsPinned:
            assert plan.outcome is Outcome.SLOTS_PINNED
            continue
        assert (pool.snapshot().backends_started > started) == (plan.outcome is Outcome.LOAD)
        assert result.already_loaded == (plan.outcome in (Outcome.ALREADY_LOADED, Outcome.REUSE))
        await eventually(lambda: at_rest(pool), 10, "the pool at rest")


async def test_plan_for_a_crashed_pinned_model_awaiting_its_restart(
    tiny_model: Path, tmp_path: Path, pools: list[Pool]
) -> None:
    pool = make_pool(
        tmp_path,
        {"a": fake_spec("a", tiny_model, "--exit-after-seconds", "0.5"), "b": fake_spec("b", tiny_model)},
        max_loaded={ModelType.LLM: 1},
        health_check_seconds=0,
        restart_backoff_seconds=60,
    )
    pools.append(pool)
    await pool.load("a", RequestedOptions(ctx_size=512), True).outcome()
    await eventually(lambda: state_of(pool, "a") is ModelState.FAILED, 5, "a to crash")
    plan = await pool.plan("a", RequestedOptions())
    subscription = pool.bus.subscribe()
    started = pool.snapshot().backends_started
    result = await pool.load("a", RequestedOptions()).outcome()
    own = [
        e.event for e in subscription.drain() if isinstance(e.event, ModelUnloaded) and e.event.model == "a"
    ]
    assert plan.outcome is Outcome.LOAD
    assert pool.snapshot().backends_started == started + 1
    assert plan.options == result.model.options  # the crashed model's options carried over
    assert result.model.pinned
    assert [e.reason for e in own] == ([UnloadReason.RELOAD] if plan.reload else []), (plan, own)
