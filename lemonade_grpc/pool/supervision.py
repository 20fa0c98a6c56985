"""What happens to a loaded model without a request asking: crashes, restarts, idle unloads, memory pressure.

The watchdog reports a crash (`crashed`), a request a refused connection
(`refused`); a pinned model that crashed is restarted after its backoff
through the same locked load path as any Load. An unpinned, unused model
is stopped when its idle countdown ends (DESIGN.md item 6), and unpinned
models are stopped while available memory is below the reserve. Each
decision is a pure function of `policy`; this module keeps the timers and
acts on the decisions through the model table and the stopper.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable

from lemonade_grpc.core import options as opts
from lemonade_grpc.core.errors import BackendCrashed, LemonadeError, LoadAbortedByShutdown, LoadCancelled
from lemonade_grpc.core.settings import PoolSettings
from lemonade_grpc.core.tasks import TaskOwner
from lemonade_grpc.pool import policy
from lemonade_grpc.pool.events import EventBus, PoolWarning, UnloadReason
from lemonade_grpc.pool.jobs import LoadJob, LoadOrigin
from lemonade_grpc.pool.memory import MemoryProbe, mib
from lemonade_grpc.pool.model import Lease, Model, ModelState
from lemonade_grpc.pool.observer import PoolObserver
from lemonade_grpc.pool.pins import Pins
from lemonade_grpc.pool.stops import Stopper, cancel_idle, revoke
from lemonade_grpc.pool.table import ModelTable
from lemonade_grpc.pool.watchdog import CrashHistory, Watchdog

log = logging.getLogger(__name__)

# `Pool.load` as a restart calls it: (name, options, pinned, origin) -> the job.
Loader = Callable[..., LoadJob]


def resident(model: Model) -> policy.Resident:
    """What the eviction policy needs to know of `model`."""
    rss = model.backend.process.rss_bytes() if model.backend is not None else 0
    return policy.Resident(
        model.name, model.pinned, len(model.leases), model.last_used_at or 0.0, rss, model.type
    )


class Supervisor:
    """Crashes, restarts, idle countdowns and the memory check. Loop thread only."""

    def __init__(
        self,
        table: ModelTable,
        stopper: Stopper,
        pins: Pins,
        settings: PoolSettings,
        *,
        bus: EventBus,
        observer: PoolObserver,
        memory: MemoryProbe,
        clock: Callable[[], float],
        background: TaskOwner,
        closing: asyncio.Event,
        load: Loader,
    ) -> None:
        self._table = table
        self._stopper = stopper
        self._pins = pins
        self._settings = settings
        self._bus = bus
        self._observer = observer
        self._memory = memory
        self._clock = clock
        self._background = background
        self._closing = closing
        self._load = load
        self._watchdog = Watchdog(settings, background, self.crashed)
        self._crashes = CrashHistory(settings, clock)
        self._memory_low = False

    def warn(self, code: str, message: str, *models: str) -> None:
        self._bus.publish(PoolWarning(code, message, tuple(models)))

    def watch(self, model: Model) -> None:
        """Watch READY `model`'s backend for an exit or a hang. Once per backend."""
        self._watchdog.watch(model)

    # ------------------------------------------------------------ crashes

    def crashed(self, model: Model, message: str) -> None:
        """Mark READY `model` crashed: its requests end BACKEND_CRASHED; a pinned one is restarted.

        Does nothing when `model` is no longer the current READY one (a
        stale watcher: it was reloaded, unloaded or is being stopped).
        """
        if not self._table.is_current(model) or model.state is not ModelState.READY:
            return
        backend = model.backend
        assert backend is not None
        revoke(model, BackendCrashed(f"the backend of {model.name} {message}"))
        cancel_idle(model)
        log.debug("%s: backend pid %d %s", model.name, backend.pid, message)
        self._table.set_state(model, ModelState.FAILED, message=message)
        backend.process.kill_group()  # exited: its group's leftovers; hung: no grace
        self._stopper.teardown(backend.stop(0), f"clean up {model.name}")
        if model.pinned and not self._closing.is_set():
            self.schedule_restart(model, "crashed")

    def refused(self, name: str, lease: Lease) -> None:
        """`lease`'s backend refused a connection: it died before the watchdog saw it exit.

        A READY backend always listens; one that refuses is gone, or as good
        as gone. Marked crashed now (its other requests end, a pinned one is
        restarted) so that the next lease loads it anew instead of meeting
        the same refusal. Does nothing when `lease` holds an older backend.
        """
        model = self._table.ready(name)
        if model is not None and model.backend is lease.backend:
            self.crashed(model, "refused a connection")

    # ----------------------------------------------------------- restarts

    def schedule_restart(self, model: Model, what: str) -> None:
        """Restart pinned FAILED `model` after its backoff, or give up when it keeps failing.

        `what` happened to it, for the warning ("crashed"). Each call counts
        toward `max_restarts` within `restart_window_seconds`.
        """
        count, delay = self._crashes.record(model.name)
        if delay is None:
            self._table.set_pin(model, False)
            self._pins.drop(model.name)
            window = self._settings.restart_window_seconds
            self.warn(
                "RESTARTS_EXHAUSTED",
                f"{model.name} crashed {count} times within {window:g} s:"
                " it is not restarted again and is no longer pinned; Load it to try again",
                model.name,
            )
            return
        self.warn(
            "RESTART_SCHEDULED",
            f"{model.name} {what}; restarting it in {delay:g} s with its pin and options",
            model.name,
        )
        model.restart_timer = asyncio.get_running_loop().call_later(
            delay, self._restart, model, context=contextvars.Context()
        )

    def _restart(self, model: Model) -> None:
        model.restart_timer = None
        if (
            self._closing.is_set()
            or not self._table.is_current(model)
            or model.state is not ModelState.FAILED
        ):
            return  # unloaded or loaded again meanwhile
        try:
            job = self._load(model.name, opts.requesting(model.options), True, origin=LoadOrigin.RESTART)
        except LemonadeError as error:
            self._restart_failed(model.name, error)
            return
        self._observer.restarting(model.name)

        async def follow() -> None:
            # What becomes of the pin is the loader's decision, as for any load.
            try:
                await job.outcome()
            except (LoadCancelled, LoadAbortedByShutdown):
                pass
            except LemonadeError as error:
                log.warning("%s: restart failed: %s", job.name, error.message)

        self._background.spawn(follow(), f"restart {model.name}")

    def _restart_failed(self, name: str, error: LemonadeError) -> None:
        model = self._table.get(name)
        if model is not None:
            self._table.set_pin(model, False)  # Status agrees with the pins file
        self._pins.drop(name)
        self.warn("RESTART_FAILED", f"{name} could not be restarted: {error.message}", name)

    # --------------------------------------------------------------- idle

    def arm_idle(self, model: Model) -> None:
        """(Re)start `model`'s idle countdown if it may be idle-unloaded, else stop it (DESIGN.md item 6)."""
        cancel_idle(model)
        seconds = model.options.idle_seconds(self._settings.idle_unload_seconds)
        if seconds <= 0 or model.pinned or model.leases or model.state is not ModelState.READY:
            return
        model.idle_unload_at = self._clock() + seconds
        # The pool's timer, not the last request's: its own context (no request's trace in its log line).
        model.idle_timer = asyncio.get_running_loop().call_later(
            seconds, self._idle_expired, model, context=contextvars.Context()
        )

    def _idle_expired(self, model: Model) -> None:
        # A cancelled timer never fires: a request, a pin or a stop since it
        # was armed replaced or cancelled it. Checked again all the same.
        model.idle_timer = None
        if self._table.ready(model.name) is model and not model.leases and not model.pinned:
            self._stopper.stop(model, UnloadReason.IDLE)

    # ------------------------------------------------------------- memory

    async def watch_memory(self) -> None:
        """Every `memory_check_seconds`, evict unpinned models while memory is below the reserve.

        Only while a model is READY (there is nothing to evict otherwise): a
        server with nothing loaded never wakes up for it (issue 13, idle CPU).
        """
        while True:
            await self._table.maybe_ready.wait()
            await asyncio.sleep(self._settings.memory_check_seconds)
            if not self._table.in_state(ModelState.READY):
                self._table.maybe_ready.clear()  # set again by the next READY
                continue
            available = self._memory.available_bytes()
            if available >= self._settings.memory_reserve_bytes:
                self._memory_low = False
            else:
                self._relieve_memory(available)

    def _relieve_memory(self, available: int) -> None:
        """Stop unpinned models, idle before busy, least recently used first, until the reserve is free."""
        reserve = self._settings.memory_reserve_bytes
        ready = [resident(m) for m in self._table.in_state(ModelState.READY)]
        plan = policy.relieve_pressure(available, reserve, ready, freeing=self._stopper.freeing_bytes())
        if plan.short is not None and not self._memory_low:
            self.warn(
                "MEMORY_LOW",
                f"{mib(available)} available, below the reserve of {mib(reserve)}, and unpinned models"
                f" free only {mib(plan.short.freeable)}; pinned models are kept",
                *plan.victims,
            )
        self._memory_low = plan.short is not None
        if plan.victims:
            log.warning(
                "memory: %s available, below %s: evicting %s", mib(available), mib(reserve), plan.victims
            )
        for victim in plan.victims:
            victim_model = self._table.get(victim)
            assert victim_model is not None
            self._stopper.stop(victim_model, UnloadReason.MEMORY_PRESSURE)
