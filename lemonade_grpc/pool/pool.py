"""Pool: which models are resident, behind one facade.

The pool is split by concern; this module wires the parts together and is
the only one the API layer calls:

| concern | type | module |
|---|---|---|
| the models; the one writer of their state, pin and options | `ModelTable` | `pool/table.py` |
| the job queue, the load lock, placement, Plan | `Loader` | `pool/loader.py` |
| stopping models; the stops in flight | `Stopper` | `pool/stops.py` |
| crashes, restarts, idle unloads, memory pressure | `Supervisor` | `pool/supervision.py` |
| requests' leases and stream slots | `Leases` | `pool/leases.py` |
| pinned models, written to the pins file in the background | `Pins` | `pool/pins.py` |

Pool work belongs to the pool, not to the request that asked (DESIGN.md
lesson 9): loads run in pool-owned jobs, and a stop runs in a pool-owned
task started, with the model marked UNLOADING, in the same step as the
decision to stop it. A client's cancellation or deadline detaches that
client only: nothing is cut half-way, nothing is left transitional (issue
#9 finding 1: an Unload cancelling a load that was evicting a busy model
left that model UNLOADING forever beside a second process in a one-slot
pool). Reads (`snapshot`) and inference on a READY model (`lease`) never
take the load lock. The pool never imports grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

from lemonade_grpc.core import bounds
from lemonade_grpc.core import options as opts
from lemonade_grpc.core.catalog import ModelSpec
from lemonade_grpc.core.errors import (
    InvalidRequest,
    LemonadeError,
    LoadAbortedByShutdown,
    LoadCancelled,
    ModelNotFound,
    ModelNotLoaded,
    ShuttingDown,
    StateWriteFailed,
)
from lemonade_grpc.core.options import RequestedOptions
from lemonade_grpc.core.settings import Limits, PoolSettings
from lemonade_grpc.core.tasks import TaskOwner
from lemonade_grpc.pool.events import EventBus, UnloadReason
from lemonade_grpc.pool.forecast import LoadForecast
from lemonade_grpc.pool.jobs import LoadJob, LoadOrigin
from lemonade_grpc.pool.leases import Leases
from lemonade_grpc.pool.loader import BackendLauncher, Loader, MemoryEstimator, file_size
from lemonade_grpc.pool.memory import MemoryProbe, SystemMemory
from lemonade_grpc.pool.model import Lease, ModelState, ModelView
from lemonade_grpc.pool.observer import PoolObserver
from lemonade_grpc.pool.pins import Pins, plan_restore
from lemonade_grpc.pool.stops import Stopper, quiet
from lemonade_grpc.pool.supervision import Supervisor
from lemonade_grpc.pool.table import ModelTable
from lemonade_grpc.pool.views import MemoryView, PoolView, load_view, model_view, slot_views
from lemonade_grpc.store.pin_file import PinFile

__all__ = ["BackendLauncher", "MemoryEstimator", "Pool", "file_size"]

log = logging.getLogger(__name__)


class Pool:
    """The set of resident models and the one lock that changes it.

    Public methods are called from the event loop's thread only.
    """

    def __init__(
        self,
        catalog: Mapping[str, ModelSpec],
        settings: PoolSettings,
        launch: BackendLauncher,
        *,
        limits: Limits | None = None,
        bus: EventBus | None = None,
        clock: Callable[[], float] = time.time,
        pin_file: PinFile | None = None,
        memory: MemoryProbe | None = None,
        estimate: MemoryEstimator = file_size,
        observer: PoolObserver | None = None,
    ) -> None:
        self.catalog = dict(catalog)
        self.settings = settings
        self.limits = limits or Limits()
        self.bus = bus or EventBus(
            subscriber_queue=self.limits.watch_queue_events,
            max_subscribers=self.limits.max_watch_streams,
            clock=clock,
        )
        self._memory: MemoryProbe = memory or SystemMemory()
        observer = observer or PoolObserver()
        # Set by `begin_shutdown`: every part refuses new work from then on.
        self._closing = asyncio.Event()
        # Loads and stops: never cancelled by a client, awaited at shutdown.
        self._work = TaskOwner("pool")
        # Watchers and followers: cancelled at shutdown.
        self._background = TaskOwner("pool watchers")
        # The table calls back into the supervisor (a pin or options change re-arms the idle
        # countdown), which is built on the table: bound late, through this lambda.
        self._table = ModelTable(self.bus, observer, lambda model: self._supervisor.arm_idle(model))
        self._pins = Pins(
            pin_file, self._work, lambda problem: self._supervisor.warn("STATE_WRITE_FAILED", problem)
        )
        self._stopper = Stopper(self._table, settings, self._work)
        self._supervisor = Supervisor(
            self._table,
            self._stopper,
            self._pins,
            settings,
            bus=self.bus,
            observer=observer,
            memory=self._memory,
            clock=clock,
            background=self._background,
            closing=self._closing,
            load=self.load,
        )
        self._loader = Loader(
            self.catalog,
            settings,
            self.limits,
            launch,
            table=self._table,
            stopper=self._stopper,
            supervisor=self._supervisor,
            pins=self._pins,
            bus=self.bus,
            observer=observer,
            memory=self._memory,
            estimate=estimate,
            clock=clock,
            work=self._work,
            closing=self._closing,
            spec=self.spec,
        )
        self._leases = Leases(
            self.limits,
            table=self._table,
            loader=self._loader,
            supervisor=self._supervisor,
            clock=clock,
            closing=self._closing,
        )

    # ----------------------------------------------------------------- loads

    def load(
        self,
        name: str,
        requested: RequestedOptions,
        pinned: bool | None = None,
        *,
        origin: LoadOrigin = LoadOrigin.REQUEST,
    ) -> LoadJob:
        """Ensure `name` is loaded with `requested`; return the job to follow.

        Raises at once `InvalidRequest`, `ModelNotFound`, `InvalidOptions`,
        `ShuttingDown`, or `Overloaded` when `limits.max_queued_loads` loads
        already wait (never for a restart or a restored pin: at most one per
        model, and a busy queue must not cost a crashed model its pin); every
        other failure is raised by `LoadJob.outcome`. An
        identical request already queued or running is joined instead of
        repeated. A request that would change nothing is answered at once,
        without queueing. The job runs to its end even if nobody follows it;
        only `unload` and shutdown cancel it.
        """
        return self._loader.load(name, requested, pinned, origin)

    async def plan(self, name: str, requested: RequestedOptions, pinned: bool | None = None) -> LoadForecast:
        """What `load(name, requested, pinned)` would do now, without doing it (issue 12).

        Raises what `load` raises at once for a request it refuses. Decided
        by the functions the load path runs, and at the same points of it:
        what changes nothing, what keeps the process, then the placement;
        a failure carries the load's own message.
        """
        return await self._loader.plan(name, requested, pinned)

    def refused(self, name: str, lease: Lease) -> None:
        """`lease`'s backend refused a connection: the model is marked crashed (see `Supervisor.refused`)."""
        self._supervisor.refused(name, lease)

    # ----------------------------------------------------------- start-up

    def start(self, *, restore: bool = True) -> None:
        """Start background work: the memory check and, with `restore`, loading the saved pins.

        Call once the server listens: restored models load in the background,
        through the same locked path as any Load, and Status shows them.
        """
        if self.settings.memory_check_seconds > 0:
            self._background.spawn(self._supervisor.watch_memory(), "memory check")
        if restore:
            self._restore_pins()

    def _restore_pins(self) -> None:
        saved, problem = self._pins.read_saved()
        if problem is not None:
            log.warning("pins: %s", problem)
            self._supervisor.warn("STATE_FILE_CORRUPT", problem)
        plan = plan_restore(saved, self.catalog, self.settings.max_loaded)
        for name in plan.restore:
            self._pins.keep(name, saved[name])
        if plan.dropped:
            self._pins.drop(*plan.dropped)
            self._supervisor.warn(
                "PINS_NOT_RESTORED",
                "not loaded again, and no longer pinned: "
                + "; ".join(f"{bounds.echo(name)}: {why}" for name, why in plan.dropped.items()),
                *plan.dropped,
            )
        for name in plan.restore:
            job = self.load(name, opts.requesting(saved[name]), True, origin=LoadOrigin.RESTORE)
            self._background.spawn(self._report_restore(job), f"restore {name}")
        log.info("pins: restoring %s", ", ".join(plan.restore) or "none")

    async def _report_restore(self, job: LoadJob) -> None:
        try:
            await job.outcome()
        except LemonadeError as error:
            self._supervisor.warn(
                "PIN_NOT_RESTORED",
                f"{job.name} could not be loaded again ({error.reason}): {error.message}",
                job.name,
            )

    # ------------------------------------------------------------------ pins

    async def pin(self, name: str, pinned: bool) -> ModelView:
        """Set the pin of a READY model; return its state once the pin is on disk. Safe to repeat.

        Takes no lock: the check and the change happen with no await between
        them, and a model chosen for eviction or unloading is already
        UNLOADING. Raises `ModelNotFound`, `ModelNotLoaded` when the model is
        not READY, or `StateWriteFailed` when the pin holds but could not be
        saved.
        """
        self.spec(name)
        model = self._table.get(name)
        if model is None or model.state is not ModelState.READY:
            state = "not loaded" if model is None else model.state.value
            raise ModelNotLoaded(f"{name} is {state}; Load it with pinned = true to pin it once loaded")
        self._table.set_pin(model, pinned)
        self._loader.remember_pin(model)
        # The model as this Pin left it: by the time the file is written a
        # concurrent Pin or Unload may have changed it (Status and Watch say so).
        view = model_view(model)
        problem = await self._pins.flush()
        if problem is not None:
            raise StateWriteFailed(
                f"{name} is {'pinned' if pinned else 'unpinned'} until the server stops, but {problem}"
            )
        return view

    # --------------------------------------------------------------- unloads

    def unload(self, name: str = "") -> asyncio.Task[list[str]]:
        """Stop `name` (every model when empty); the returned task gives the names stopped.

        Everything is decided now, with no await: the models are marked
        UNLOADING and their pins dropped at once (so a Pin arriving later
        fails instead of bringing the pin back, issue #9 findings 6 and 19),
        and loads of them, queued or running, are cancelled (what they
        spawned is killed). The returned task is the pool's: a caller that
        stops waiting for it (cancelled, deadline) does not stop the unload.
        Unloading a model that is not loaded is not an error: the result is
        then empty. Raises `InvalidRequest` or `ModelNotFound` for a bad name.
        """
        if name:
            self.spec(name)
        names = {name} if name else set(self.catalog)
        self._pins.drop(*sorted(names))
        jobs = [job for job in self._loader.running_jobs() if job.name in names]
        for job in jobs:
            self._loader.cancel(job, LoadCancelled(f"load of {job.name} was cancelled by an Unload"))
        models = [m for m in self._table if m.name in names and m.state is not ModelState.LOADING]
        stops = [self._stopper.stop(m, UnloadReason.REQUESTED) for m in models]
        unloaded = sorted({job.name for job in jobs} | {m.name for m in models})
        waits = {job.task for job in jobs if job.task is not None} | set(stops)

        async def done() -> list[str]:
            if waits:
                await asyncio.wait(waits)
            await self._pins.flush()
            return unloaded

        return self._work.spawn(done(), f"unload {name or 'all'}")

    # -------------------------------------------------------------- shutdown

    def begin_shutdown(self) -> None:
        """At the stop signal: refuse new work, end loads (ABORTED, SHUTTING_DOWN) and Watch streams.

        Inference streams running go on (see `drain`). Idempotent.
        """
        if self._closing.is_set():
            return
        self._closing.set()
        for job in self._loader.running_jobs():
            self._loader.cancel(
                job, LoadAbortedByShutdown(f"load of {job.name} stopped: the server is shutting down")
            )
        for model in self._table:
            quiet(model)
        self._leases.close()
        self.bus.close(ShuttingDown("the server is shutting down"))

    async def drain(self, seconds: float) -> None:
        """Wait up to `seconds` for the inference streams running to end."""
        await self._leases.drain(seconds)

    async def shutdown(self) -> None:
        """End every load and stream and stop every backend (reason SHUTDOWN). Idempotent.

        Streams still running end with SHUTTING_DOWN. Pins stay saved: the
        next start loads them again.
        """
        self.begin_shutdown()
        self._stopper.hurry.set()
        while True:
            for model in self._table:
                if model.state in (ModelState.READY, ModelState.FAILED):
                    self._stopper.stop(model, UnloadReason.SHUTDOWN, lease_grace=0)
            jobs = {job.task for job in self._loader.running_jobs() if job.task is not None}
            pending = jobs | self._stopper.in_flight()
            if not pending:
                break
            await asyncio.wait(pending)
        await self._background.close()
        await self._pins.flush()
        await self._work.close()

    def kill_now(self) -> None:
        """SIGKILL every backend's process group at once, without waiting. For a forced exit."""
        for model in self._table:
            if model.backend is not None:
                model.backend.process.kill_group()

    # ------------------------------------------------------------- inference

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Lease]:
        """Hold `name` for one request; load it first (catalog options) if needed.

        Waits for a stream slot first (`[limits]`; `Overloaded` when the
        queue is full). A READY model is leased without the lock. A model
        that is not READY is loaded through the locked path, joining a load
        in flight; a loaded model is never reloaded for inference. Raises
        what `load` and `LoadJob.outcome` raise, `ShuttingDown`, or
        `ModelNotLoaded` if the model went away between its load and the lease.
        """
        if self._closing.is_set():
            raise ShuttingDown("the server is shutting down")
        self.spec(name)
        async with self._leases.lease(name) as lease:
            yield lease

    # ---------------------------------------------------------------- status

    def snapshot(self) -> PoolView:
        """The pool's state now. Never waits for the lock."""
        models = tuple(model_view(m) for m in sorted(self._table, key=lambda m: m.name))
        streams = self._leases.view()
        current = self._loader.current
        return PoolView(
            models=models,
            slots=slot_views(models, self.settings.max_loaded),
            memory=MemoryView(
                self._memory.total_bytes(), self._memory.available_bytes(), sum(m.rss_bytes for m in models)
            ),
            load_in_flight=load_view(current) if current else None,
            queue=tuple(load_view(job) for job in self._loader.waiting),
            sequence=self.bus.last_sequence,
            backends_started=self._loader.backends_started,
            streams_running=streams.running,
            streams_queued=streams.queued,
        )

    def model_view(self, name: str) -> ModelView | None:
        """The state of `name`, or None when it is not in the pool."""
        model = self._table.get(name)
        return model_view(model) if model is not None else None

    def views(self) -> Iterator[ModelView]:
        """Every model in the pool."""
        return (model_view(m) for m in self._table)

    def spec(self, name: str) -> ModelSpec:
        """The catalog entry of `name`; `InvalidRequest` for a malformed name, else `ModelNotFound`."""
        problem = bounds.model_name_problem(name)
        if problem is not None:
            raise InvalidRequest(f"model {problem}", field="model")
        try:
            return self.catalog[name]
        except KeyError:
            known = sorted(self.catalog)
            listed = ", ".join(known[:20]) + (f" and {len(known) - 20} more" if len(known) > 20 else "")
            raise ModelNotFound(f"no model named {name!r} in the catalog (known: {listed})") from None
