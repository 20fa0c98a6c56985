"""The load path: the job queue, the one lock, placement, and what `plan` foresees.

The whole load path (decide, evict, spawn, wait until healthy, commit) runs
under `Loader._lock`, an `asyncio.Lock`, which is FIFO. Two loads can never
leave two processes for one model (Unsloth Studio #5161/#5401: an orphaned
86 GB server OOM-killed the host), and the already-loaded decision can never
race a reload (Lemonade #1603/#1604: check-then-act reloaded a 68 GB model).

Loads run in pool-owned jobs (DESIGN.md lesson 9): a client's cancellation
or deadline detaches that client only; only Unload and shutdown cancel a
job.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.core import options as opts
from lemonade_grpc.core.catalog import ModelSpec
from lemonade_grpc.core.errors import (
    InsufficientMemory,
    InternalError,
    LemonadeError,
    LoadAbortedByShutdown,
    LoadCancelled,
    Overloaded,
    ShuttingDown,
    SlotsPinned,
    exhausted_resource,
    server_resources_exhausted,
)
from lemonade_grpc.core.options import EffectiveOptions, RequestedOptions
from lemonade_grpc.core.settings import Limits, PoolSettings
from lemonade_grpc.core.tasks import TaskOwner
from lemonade_grpc.pool import policy
from lemonade_grpc.pool.events import EventBus, LoadFailed, LoadPhase, LoadProgress, UnloadReason
from lemonade_grpc.pool.forecast import LoadForecast, Outcome
from lemonade_grpc.pool.jobs import JobKey, LoadJob, LoadOrigin, LoadResult, job_key
from lemonade_grpc.pool.memory import MemoryProbe, mib
from lemonade_grpc.pool.model import Model, ModelState
from lemonade_grpc.pool.observer import Attributes, PoolObserver
from lemonade_grpc.pool.pins import Pins
from lemonade_grpc.pool.stops import Stopper
from lemonade_grpc.pool.supervision import Supervisor, resident
from lemonade_grpc.pool.table import ModelTable
from lemonade_grpc.pool.views import model_view

log = logging.getLogger(__name__)

MemoryEstimator = Callable[[ModelSpec, EffectiveOptions], int]


class BackendLauncher(Protocol):
    """Starts a backend and returns it once healthy (`Backend.launch` with its settings bound).

    Calls `on_spawned` with each process it spawns, and `on_progress(fraction,
    message)` as the load advances (when it can tell). On failure or
    cancellation it stops whatever it spawned before raising.
    """

    def __call__(
        self,
        spec: ModelSpec,
        options: EffectiveOptions,
        *,
        on_spawned: Callable[[Backend], None],
        on_progress: Callable[[float, str], None],
    ) -> Awaitable[Backend]: ...


def file_size(spec: ModelSpec, options: EffectiveOptions) -> int:
    """The simplest memory estimate: the model file's size."""
    try:
        return spec.path.stat().st_size
    except OSError:
        return 0


# Plans' memory estimates (a file header read each, in a worker thread) at once, at most.
PLAN_ESTIMATES = 4

# Loads the pool starts itself, at most one per model at a time: never refused for a full queue.
INTERNAL_ORIGINS = frozenset({LoadOrigin.RESTART, LoadOrigin.RESTORE})


def _slots_pinned(spec: ModelSpec, placement: policy.NoRoom) -> SlotsPinned:
    return SlotsPinned(
        f"every {spec.type.value} slot is held by a pinned model ({', '.join(placement.pinned)});"
        f" unpin one to load {spec.name}"
    )


def _insufficient_memory(spec: ModelSpec, placement: policy.NotEnoughMemory) -> InsufficientMemory:
    return InsufficientMemory(
        f"{spec.name} needs about {mib(placement.need)} ({placement.need:,} bytes: model file and context);"
        f" {mib(placement.available)} is available, {mib(placement.reserve)} is kept in reserve"
        f" ([pool] memory_reserve_mb), and evicting every idle unpinned model would free"
        f" only {mib(placement.freeable)}"
    )


@dataclass(frozen=True, slots=True)
class Opening:
    """A Load request read against the pool now: the opening `load` and `plan` share."""

    spec: ModelSpec
    running: Model | None  # READY now
    base: Model | None  # READY, or pinned and crashed (its restart pending): whose options it keeps
    wanted: EffectiveOptions
    changes_nothing: bool


class Loader:
    """Load jobs, their queue, and the lock the load path runs under. Loop thread only."""

    def __init__(
        self,
        catalog: dict[str, ModelSpec],
        settings: PoolSettings,
        limits: Limits,
        launch: BackendLauncher,
        *,
        table: ModelTable,
        stopper: Stopper,
        supervisor: Supervisor,
        pins: Pins,
        bus: EventBus,
        observer: PoolObserver,
        memory: MemoryProbe,
        estimate: MemoryEstimator,
        clock: Callable[[], float],
        work: TaskOwner,
        closing: asyncio.Event,
        spec: Callable[[str], ModelSpec],
    ) -> None:
        self._catalog = catalog
        self._settings = settings
        self._limits = limits
        self._launch = launch
        self._table = table
        self._stopper = stopper
        self._supervisor = supervisor
        self._pins = pins
        self._bus = bus
        self._observer = observer
        self._memory = memory
        self._estimate = estimate
        self._clock = clock
        self._work = work
        self._closing = closing
        self._spec = spec
        self._lock = asyncio.Lock()
        self._estimates = asyncio.Semaphore(PLAN_ESTIMATES)
        self.jobs: dict[JobKey, LoadJob] = {}
        self.waiting: list[LoadJob] = []
        self.current: LoadJob | None = None
        self.backends_started = 0

    def _open(self, name: str, requested: RequestedOptions, pinned: bool | None) -> Opening:
        """Refuse what is refused at once (`ShuttingDown`, a bad name or options); read the rest."""
        if self._closing.is_set():
            raise ShuttingDown("the server is shutting down")
        spec = self._spec(name)
        opts.validate(requested, name, spec.allowed_args)
        running = self._table.ready(name)
        # A pinned model that crashed keeps its pin and options while its
        # restart is pending: a Load or a request that comes first loads
        # it with them (absent fields keep the current options).
        base = running or self._table.awaiting_restart(name)
        wanted = opts.resolve(requested, base.options if base else None, spec.defaults)
        settled = running is not None and policy.changes_nothing(
            running.options, running.pinned, wanted, pinned
        )
        return Opening(spec, running, base, wanted, settled)

    # ------------------------------------------------------------- queue

    def load(
        self, name: str, requested: RequestedOptions, pinned: bool | None, origin: LoadOrigin
    ) -> LoadJob:
        """See `Pool.load`."""
        request = self._open(name, requested, pinned)
        if request.changes_nothing:
            assert request.running is not None
            # Nothing is acted on, so no lock is needed; like any status,
            # the answer may go stale the moment it is sent.
            result = LoadResult(model_view(request.running), already_loaded=True, evicted=())
            settled = LoadJob.settled(name, result)
            self._observer.load_ended(settled, result, None)
            return settled
        job = LoadJob(name, requested, pinned, origin, self._clock())
        joined = self.jobs.get(job.key)
        if joined is not None and not joined.done:
            return joined
        if origin not in INTERNAL_ORIGINS:
            self._check_queue_room()
        self.jobs[job.key] = job
        self.waiting.append(job)
        position = self._queue_position(job)
        self._progress(
            job, LoadPhase.QUEUED, queue_position=position, attributes={"lemonade.queue_position": position}
        )
        job.task = self._work.spawn(self._run(job), f"load {name}")
        job.task.add_done_callback(lambda task: self._job_ended(job, task))
        return job

    def _check_queue_room(self) -> None:
        """`Overloaded` when `limits.max_queued_loads` loads already wait for the lock."""
        if len(self.waiting) >= self._limits.max_queued_loads:
            raise Overloaded(
                f"{len(self.waiting)} loads are already waiting for the load lock"
                f" ([limits] max_queued_loads = {self._limits.max_queued_loads}); try again later"
            )

    def _queue_position(self, job: LoadJob) -> int:
        return self.waiting.index(job) + (self.current is not None)

    def cancel(self, job: LoadJob, error: LemonadeError) -> None:
        """End `job` with `error` (what its cancellation means): its followers get it."""
        if job.task is not None and not job.task.done():
            job.cancel_error = error
            job.task.cancel()

    def running_jobs(self) -> list[LoadJob]:
        return [job for job in self.jobs.values() if job.task is not None and not job.task.done()]

    async def _run(self, job: LoadJob) -> None:
        """A job's task: wait for the lock, load, settle the job with its result or error."""
        try:
            async with self._lock:
                self.waiting.remove(job)
                self.current = job
                self._announce_queue()
                result = await self._load_locked(job)
        except LemonadeError as error:
            self._fail(job, error)
        except Exception as error:
            shortage = exhausted_resource(error)
            if shortage is not None:
                # Out of descriptors or memory: ours, not a bug (issue 18 finding 5:
                # a /proc/meminfo read failing EMFILE was answered INTERNAL).
                log.warning("load of %s failed: the server ran out of resources: %s", job.name, error)
                self._fail(job, server_resources_exhausted(shortage))
                return
            # A bug of ours must not leave the job's followers waiting forever
            # (issue #9 finding 16): the job ends, the traceback is logged.
            log.exception("load of %s failed unexpectedly", job.name)
            self._fail(
                job, InternalError(f"load of {job.name} failed: internal error ({type(error).__name__})")
            )
        else:
            job.finish(result, None)
            self._observer.load_ended(job, result, None)

    def _job_ended(self, job: LoadJob, task: asyncio.Task[None]) -> None:
        """The job's task is over, however it ended: forget the job, settle it if `_run` could not.

        A done callback, not a `finally` in `_run`: a task cancelled before
        its first step never runs its coroutine at all, and would leave the
        job queued forever, its followers waiting.
        """
        if job in self.waiting:
            self.waiting.remove(job)
            self._announce_queue()
        if self.current is job:
            self.current = None
        if self.jobs.get(job.key) is job:
            del self.jobs[job.key]
        if not job.done:
            # Unload or shutdown cancelled it; what the load spawned is
            # stopped already (the launcher's contract), and the stops it
            # started have run to their end (`settle`).
            self._fail(job, job.cancel_error or LoadCancelled(f"load of {job.name} was cancelled"))

    def _fail(self, job: LoadJob, error: LemonadeError) -> None:
        job.finish(None, error)
        self._observer.load_ended(job, None, error)
        self._bus.publish(LoadFailed(job.name, error.reason, error.message))
        model = self._table.get(job.name)
        failed = model if model is not None and model.state is ModelState.FAILED else None
        decision = policy.after_failed_load(
            cancelled=isinstance(error, LoadCancelled | LoadAbortedByShutdown) or self._closing.is_set(),
            ready=model is not None and model.state is ModelState.READY,
            pinned=failed is not None and failed.pinned,
            pin_in_force=job.pin_in_force,
            restart_pending=failed is not None and failed.restart_timer is not None,
            restart=job.origin is LoadOrigin.RESTART,
        )
        if decision is policy.FailedLoadPlan.RESTART:
            assert failed is not None
            self._supervisor.schedule_restart(failed, f"could not be started ({error.reason})")
        elif decision is policy.FailedLoadPlan.UNPIN:
            if failed is not None:
                self._table.set_pin(failed, False)  # Status agrees with the pins file
            self._pins.drop(job.name)

    def _announce_queue(self) -> None:
        """Tell each waiting load its new place in the queue."""
        for job in self.waiting:
            position = self._queue_position(job)
            if job.history[-1].queue_position != position:
                self._progress(
                    job,
                    LoadPhase.QUEUED,
                    queue_position=position,
                    attributes={"lemonade.queue_position": position},
                )

    def _progress(
        self,
        job: LoadJob,
        phase: LoadPhase,
        message: str = "",
        *,
        fraction: float = -1.0,
        queue_position: int = 0,
        attributes: Attributes | None = None,
    ) -> None:
        progress = LoadProgress(job.name, phase, fraction, message, queue_position, tuple(job.evicted))
        if not job.history or job.history[-1].phase is not phase or attributes:
            self._observer.load_phase(job, phase, attributes or {})
        job.emit(progress)
        self._bus.publish(progress)

    # --------------------------------------------------------- load path

    async def _load_locked(self, job: LoadJob) -> LoadResult:
        """The load path proper. Runs under the lock; every decision is taken here.

        Decisions are taken and acted on with no `await` between them, so no
        Pin, lease, stop or crash can slip in between a plan and its first
        step (issue #9 finding 15: memory victims were marked UNLOADING only
        after the slot victims had stopped, and a Pin in between was lost).
        """
        spec = self._catalog[job.name]
        await self._stopper.done()
        while True:
            running = self._table.ready(job.name)
            crashed = self._table.awaiting_restart(job.name)
            base = running or crashed
            job.pin_in_force = base is not None and base.pinned
            wanted = opts.resolve(job.requested, base.options if base else None, spec.defaults)
            if running is not None and policy.reuses_process(running.options, wanted):
                result = self._reuse(job, running, wanted)
                await self._pins.flush()  # a pin set by this load is on disk when it answers
                return result
            need = await asyncio.to_thread(self._estimate, spec, wanted)  # reads the file's header
            await self._stopper.done()  # stops that began meanwhile
            if self._table.ready(job.name) is running and self._table.awaiting_restart(job.name) is crashed:
                break  # nothing this decision rests on changed while we waited

        placement = self._placement(spec, need, self._memory.available_bytes())
        if isinstance(placement, policy.NoRoom):
            raise _slots_pinned(spec, placement)
        if isinstance(placement, policy.NotEnoughMemory):
            raise _insufficient_memory(spec, placement)
        pinned = job.pinned if job.pinned is not None else bool(base and base.pinned)
        previous = self._table.replaced(job.name)
        if previous is not None:
            self._stopper.stop(previous, UnloadReason.RELOAD)
        for victims, reason in (
            (placement.slot_victims, UnloadReason.EVICTED_LRU),
            (placement.memory_victims, UnloadReason.MEMORY_PRESSURE),
        ):
            if victims:
                job.evicted.extend(victims)
                self._progress(
                    job,
                    LoadPhase.EVICTING,
                    f"evicting {', '.join(victims)} ({reason.value})",
                    attributes={"lemonade.evicted": ", ".join(victims), "lemonade.reason": reason.value},
                )
                for victim in victims:
                    victim_model = self._table.get(victim)
                    assert victim_model is not None
                    self._stopper.stop(victim_model, reason)
        await self._stopper.done()
        return await self._start(job, spec, wanted, pinned)

    def _placement(
        self, spec: ModelSpec, need: int, available: int
    ) -> policy.Placement | policy.NoRoom | policy.NotEnoughMemory:
        """Where a load of `spec` needing `need` bytes fits with `available` bytes free now.

        The one decision `load` and `plan` share.
        """
        return policy.place_load(
            spec.name,
            spec.type,
            need,
            [resident(m) for m in self._table.in_state(ModelState.READY)],
            self._settings.slots(spec.type),
            available=available,
            reserve=self._settings.memory_reserve_bytes,
        )

    async def _start(
        self, job: LoadJob, spec: ModelSpec, wanted: EffectiveOptions, pinned: bool
    ) -> LoadResult:
        """Start `spec`'s process and commit it READY. Under the lock, every stop settled."""
        model = Model(spec, wanted, ModelState.LOADING, pinned=pinned)
        self._table.enter(model)
        self._progress(job, LoadPhase.STARTING, "starting backend")

        def spawned(backend: Backend) -> None:
            model.backend = backend
            self.backends_started += 1
            self._progress(
                job,
                LoadPhase.LOADING,
                f"backend pid {backend.pid}: waiting for /health",
                attributes={"lemonade.pid": backend.pid},
            )

        def progressed(fraction: float, message: str) -> None:
            self._progress(job, LoadPhase.LOADING, message, fraction=fraction)

        try:
            backend = await self._launch(spec, wanted, on_spawned=spawned, on_progress=progressed)
        except asyncio.CancelledError:
            shutdown = isinstance(job.cancel_error, LoadAbortedByShutdown)
            self._table.set_state(
                model,
                ModelState.STOPPED,
                reason=UnloadReason.SHUTDOWN if shutdown else UnloadReason.REQUESTED,
            )
            raise
        except LemonadeError as error:
            self._table.set_state(model, ModelState.FAILED, message=error.message)
            raise
        except BaseException as error:
            shortage = exhausted_resource(error) if isinstance(error, Exception) else None
            what = server_resources_exhausted(shortage).message if shortage else "internal error"
            self._table.set_state(model, ModelState.FAILED, message=f"{what} ({type(error).__name__})")
            raise
        model.backend = backend
        model.loaded_at = model.last_used_at = self._clock()
        self._table.set_state(model, ModelState.READY)
        self._supervisor.arm_idle(model)
        self.remember_pin(model)
        self._supervisor.watch(model)
        await self._pins.flush()  # a pinned load answers once its pin is on disk
        return LoadResult(model_view(model), already_loaded=False, evicted=tuple(job.evicted))

    def _reuse(self, job: LoadJob, running: Model, wanted: EffectiveOptions) -> LoadResult:
        """Same process: only settings that need no restart change."""
        self._table.set_pin(running, job.pinned)
        self._table.set_options(running, wanted)
        self.remember_pin(running)
        return LoadResult(model_view(running), already_loaded=True, evicted=())

    def remember_pin(self, model: Model) -> None:
        """Keep READY `model`'s pin and options in the state file, or drop it when unpinned."""
        if model.pinned and model.state is ModelState.READY:
            self._pins.keep(model.name, model.options)
        else:
            self._pins.drop(model.name)

    # -------------------------------------------------------------- plan

    async def plan(self, name: str, requested: RequestedOptions, pinned: bool | None) -> LoadForecast:
        """See `Pool.plan`."""
        request = self._open(name, requested, pinned)
        spec, running, wanted = request.spec, request.running, request.wanted
        joined = self.jobs.get(job_key(name, requested, pinned, LoadOrigin.REQUEST))
        if not request.changes_nothing and (joined is None or joined.done):
            self._check_queue_room()  # the load would be refused at once
        told = functools.partial(
            LoadForecast,
            name,
            options=wanted,
            reserve_bytes=self._settings.memory_reserve_bytes,
            loads_ahead=len(self.waiting) + (self.current is not None),
        )
        if request.changes_nothing:
            return told(
                Outcome.ALREADY_LOADED,
                message=f"{name} is loaded as asked: nothing to do",
                available_bytes=self._memory.available_bytes(),
            )
        if running is not None and policy.reuses_process(running.options, wanted):
            return told(
                Outcome.REUSE,
                message=f"{name} keeps its process; only its settings change",
                available_bytes=self._memory.available_bytes(),
            )
        async with self._estimates:  # a flood of Plans must not take every worker thread
            need = await asyncio.to_thread(self._estimate, spec, wanted)
        # Read once, after the estimate: what the placement decides on is what is reported.
        available = self._memory.available_bytes()
        told = functools.partial(told, available_bytes=available)
        # The stops under way will have given this back when the load measures memory (it waits
        # for them; a plan does not).
        placement = self._placement(spec, need, available + self._stopper.freeing_bytes())
        if isinstance(placement, policy.NoRoom):
            return told(Outcome.SLOTS_PINNED, message=_slots_pinned(spec, placement).message)
        if isinstance(placement, policy.NotEnoughMemory):
            return told(
                Outcome.INSUFFICIENT_MEMORY,
                message=_insufficient_memory(spec, placement).message,
                need_bytes=need,
            )
        evictions = tuple((victim, UnloadReason.EVICTED_LRU) for victim in placement.slot_victims) + tuple(
            (victim, UnloadReason.MEMORY_PRESSURE) for victim in placement.memory_victims
        )
        stops = [f"{victim} ({reason.value})" for victim, reason in evictions]
        reload = self._table.replaced(name) is not None
        if reload:
            stops.insert(
                0, f"its own entry, running or crashed, with other options ({UnloadReason.RELOAD.value})"
            )
        return told(
            Outcome.LOAD,
            message=f"{name} would be started" + (f" after stopping {', '.join(stops)}" if stops else ""),
            reload=reload,
            evictions=evictions,
            need_bytes=need,
        )
