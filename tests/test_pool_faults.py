"""Issue #9 findings 15-17, found by reading the pool: each pinned down in process.

The pool runs in process with real backend processes (the fake backend via
the command recipe); memory figures and the memory estimate are injected.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from conftest import eventually, fake_spec, is_gone, launcher, shut_down
from lemonade_grpc.core.catalog import ModelSpec, ModelType
from lemonade_grpc.core.errors import (
    InsufficientMemory,
    InternalError,
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
