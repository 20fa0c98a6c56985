"""Property: whatever sequence of Load/Unload/Pin, the pool's invariants hold.

Runs the real Pool in process with real backend processes (tests/fake_backend.py
through the command recipe). Each model's backend writes its pid to its own
log, so "one process per model" is checked against the operating system.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FAKE_BACKEND, is_gone, pids_in
from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.catalog import ModelSpec, ModelType, Recipe
from lemonade_grpc.pool.errors import ModelNotLoaded, SlotsPinned
from lemonade_grpc.pool.model import ModelState
from lemonade_grpc.pool.options import EffectiveOptions, RequestedOptions
from lemonade_grpc.pool.pool import Pool, PoolSettings

MODELS = ("m0", "m1", "m2")
SLOTS = 2

load_op = st.tuples(
    st.just("load"),
    st.sampled_from(MODELS),
    st.sampled_from([None, None, 512, 1024]),
    st.sampled_from([None, True, True, False]),
)
unload_op = st.tuples(st.just("unload"), st.sampled_from((*MODELS, "")))
pin_op = st.tuples(st.just("pin"), st.sampled_from(MODELS), st.booleans())
# Weighted towards loads and pins: an unload wipes out the state that makes
# interesting cases (full slots, pinned models), so it is the rarest step.
operations = st.lists(
    st.one_of(load_op, load_op, load_op, pin_op, pin_op, unload_op), min_size=3, max_size=12
)


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
                *("--pid-log", str(tmp / f"{name}.pids")),
            ),
        )
        for name in MODELS
    }


def check_invariants(pool: Pool, tmp: Path) -> None:
    live = {name: [p for p in pids_in(tmp / f"{name}.pids") if not is_gone(p)] for name in MODELS}
    assert all(len(pids) <= 1 for pids in live.values()), f"two processes for one model: {live}"
    assert sum(len(pids) for pids in live.values()) <= SLOTS, f"more processes than slots: {live}"
    views = {v.name: v for v in pool.views()}
    assert all(v.state is ModelState.READY for v in views.values()), views
    # Status equals reality: exactly the READY models have a live process, the one status names.
    assert {name: pids for name, pids in live.items() if pids} == {name: [v.pid] for name, v in views.items()}


async def run(ops: list[tuple[object, ...]], tmp: Path, model_file: Path) -> None:
    for name in MODELS:
        (tmp / f"{name}.pids").unlink(missing_ok=True)
    pool = Pool(
        catalog(tmp, model_file),
        PoolSettings(max_loaded={ModelType.LLM: SLOTS}, stop_grace_seconds=2, evict_grace_seconds=0),
        functools.partial(Backend.start, log_dir=tmp / "logs"),
    )
    try:
        for op in ops:
            pinned_before = {v.name: v.pid for v in pool.views() if v.pinned}
            unloaded: set[str] = set()
            match op:
                case ("load", str(name), ctx, pinned):
                    requested = RequestedOptions(ctx_size=ctx if isinstance(ctx, int) else None)
                    try:
                        await pool.load(
                            name, requested, pinned if isinstance(pinned, bool) else None
                        ).outcome()
                    except SlotsPinned:
                        assert len(pinned_before) == SLOTS
                    if ctx is not None and name in pinned_before and pool.model_view(name):
                        unloaded.add(name)  # a reload of a pinned model is asked for, not an eviction
                case ("unload", str(name)):
                    await pool.unload(name)
                    unloaded = {name} if name else set(MODELS)
                case ("pin", str(name), bool(pinned)):
                    try:
                        pool.pin(name, pinned)
                    except ModelNotLoaded:
                        assert pool.model_view(name) is None
            check_invariants(pool, tmp)
            for name, pid in pinned_before.items():
                view = pool.model_view(name)
                if name not in unloaded:
                    assert view is not None, f"pinned {name} was evicted by {op}"
                    assert view.pid == pid, f"pinned {name} was restarted by {op}"
    finally:
        await pool.shutdown()
    check_invariants(pool, tmp)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_pool_invariants_hold_for_any_sequence(
    ops: list[tuple[object, ...]], tmp_path: Path, tiny_model: Path
) -> None:
    asyncio.run(run(ops, tmp_path, tiny_model))
