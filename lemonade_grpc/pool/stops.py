"""Stopping models: UNLOADING at once, the process gone when the pool-owned stop task ends.

Stops need no lock: they only remove. The load path waits for every stop
in flight (`Stopper.done`) before it starts a process, so live processes
never outnumber the slots. A stop runs in a pool-owned task started in
the same step as the decision to stop (DESIGN.md lesson 9): a client's
cancellation or deadline never cuts it half-way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from lemonade_grpc.core.errors import LemonadeError, ModelEvicted, ShuttingDown
from lemonade_grpc.core.settings import PoolSettings
from lemonade_grpc.core.tasks import TaskOwner, settle, wait_for_any
from lemonade_grpc.pool.events import UnloadReason
from lemonade_grpc.pool.model import Model, ModelState
from lemonade_grpc.pool.table import ModelTable

log = logging.getLogger(__name__)


def cancel_idle(model: Model) -> None:
    """Stop `model`'s idle countdown (`Supervisor.arm_idle` starts it)."""
    if model.idle_timer is not None:
        model.idle_timer.cancel()
    model.idle_timer = None
    model.idle_unload_at = None


def quiet(model: Model) -> None:
    """Cancel `model`'s idle countdown and pending restart: nothing more is to happen to it by timer."""
    cancel_idle(model)
    if model.restart_timer is not None:
        model.restart_timer.cancel()
        model.restart_timer = None


def revoke(model: Model, error: LemonadeError) -> None:
    """Mark every lease on `model` as ended by `error` (their streams break next)."""
    for lease in list(model.leases):
        lease.revoke(error)


class Stopper:
    """Every stop in flight, and the one way a model is stopped. Loop thread only."""

    def __init__(self, table: ModelTable, settings: PoolSettings, work: TaskOwner) -> None:
        self._table = table
        self._settings = settings
        self._work = work
        # Every task stopping a backend: the load path waits for all of them
        # before it starts a process.
        self._teardowns: set[asyncio.Task[Any]] = set()
        # Set by shutdown: stops still giving requests their grace period end it now.
        self.hurry = asyncio.Event()

    def stop(
        self, model: Model, reason: UnloadReason, *, lease_grace: float | None = None
    ) -> asyncio.Task[None]:
        """Stop READY or FAILED `model`: UNLOADING now, the process gone when the returned task ends.

        Idempotent: a model already being stopped returns the stop in
        flight (and keeps its first reason). The task is the pool's: no
        caller's cancellation cuts it. Requests still using the model get
        `lease_grace` (default `evict_grace_seconds`) to finish, then end
        with MODEL_EVICTED (SHUTTING_DOWN at shutdown).
        """
        if model.stopping is not None:
            return model.stopping
        self._table.set_state(model, ModelState.UNLOADING, reason=reason)
        quiet(model)
        grace = self._settings.evict_grace_seconds if lease_grace is None else lease_grace
        model.stopping = self.teardown(self._finish(model, reason, grace), f"stop {model.name}")
        return model.stopping

    def teardown(self, work: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run `work` (stopping a process) as a pool task that loads wait for."""
        task: asyncio.Task[Any] = self._work.spawn(work, name)
        self._teardowns.add(task)
        task.add_done_callback(self._teardowns.discard)
        return task

    def in_flight(self) -> set[asyncio.Task[Any]]:
        return set(self._teardowns)

    async def done(self) -> None:
        """Wait until no backend is being stopped (cancellation waits too: `settle`)."""
        while self._teardowns:
            await settle(asyncio.ensure_future(asyncio.wait(set(self._teardowns))))

    def freeing_bytes(self) -> int:
        """The memory the stops under way will give back: the RSS of every UNLOADING model's process."""
        return sum(
            m.backend.process.rss_bytes()
            for m in self._table.in_state(ModelState.UNLOADING)
            if m.backend is not None
        )

    async def _finish(self, model: Model, reason: UnloadReason, grace: float) -> None:
        try:
            if model.leases:
                await wait_for_any([model.no_leases, self.hurry], grace)
                if model.leases:
                    # A stop begun before the signal (an Unload, an eviction)
                    # whose grace the shutdown cut short ends its requests
                    # for the shutdown's sake: UNAVAILABLE, not "retry".
                    error: LemonadeError = (
                        ShuttingDown("the server is shutting down")
                        if reason is UnloadReason.SHUTDOWN or self.hurry.is_set()
                        else ModelEvicted(f"{model.name} was unloaded ({reason.value}) during the request")
                    )
                    revoke(model, error)
            if model.backend is not None:
                status = await model.backend.stop(self._settings.stop_grace_seconds)
                log.debug(
                    "%s: stopped pid %d (%s), exit status %d",
                    model.name,
                    model.backend.pid,
                    reason.value,
                    status,
                )
        finally:
            # Whatever happened above, the model leaves the pool: never
            # UNLOADING for good.
            self._table.set_state(model, ModelState.STOPPED, reason=reason)
