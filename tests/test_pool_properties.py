"""Property: whatever clients do, and however they give up, the pool keeps its promises.

Runs the real Pool in process with real backend processes (tests/fake_backend.py
through the command recipe). Each model's backend writes its pid to its own
log, so "one process per model" and "no more processes than slots" are
checked against the operating system, not against our own bookkeeping.

Hypothesis generates rounds of concurrent operations (Load with options and
pins, Unload of one model or all, Pin, inference streams), each started after
a random delay and abandoned by its client after a random time or never (a
cancel, a short deadline, lesson 9). While they run, a sampler checks the
process table every few milliseconds; after each round, at quiescence, it
checks that no model is transitional, every live backend is in Status, and
the pins on disk are the pins in memory.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FAKE_BACKEND, is_gone, launcher, pids_in
from lemonade_grpc.backends.http import BackendConnectionError
from lemonade_grpc.core.catalog import ModelSpec, ModelType, Recipe
from lemonade_grpc.core.errors import InternalError, LemonadeError
from lemonade_grpc.core.options import EffectiveOptions, RequestedOptions
from lemonade_grpc.core.settings import PoolSettings
from lemonade_grpc.pool.model import ModelState
from lemonade_grpc.pool.pool import Pool
from lemonade_grpc.store.pin_file import PinFile

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
