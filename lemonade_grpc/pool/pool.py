"""Pool: which models are resident, decided under one lock.

The whole load path (decide, evict, spawn, wait until healthy, commit) runs
under `Pool._lock`, an `asyncio.Lock`, which is FIFO. Two loads can never leave
two processes for one model (Unsloth Studio #5161/#5401: an orphaned 86 GB
server OOM-killed the host), and the already-loaded decision can never race a
reload (Lemonade #1603/#1604: check-then-act reloaded a 68 GB model).

Pool work belongs to the pool, not to the request that asked (DESIGN.md
lesson 9). Loads run in pool-owned jobs; a stop runs in a pool-owned task
started, with the model marked UNLOADING, in the same step as the decision
to stop it. A client's cancellation or deadline detaches that client only:
nothing is cut half-way, nothing is left transitional (issue #9 finding 1:
an Unload cancelling a load that was evicting a busy model left that model
UNLOADING forever beside a second process in a one-slot pool).

Stops need no lock: they only remove. The load path waits for every stop
in flight before it starts a process, so live processes never outnumber the
slots. Reads (`snapshot`) and inference on a READY model (`lease`) never
take the lock. The pool never imports grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, Protocol

from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.core import bounds
from lemonade_grpc.core import options as opts
from lemonade_grpc.core.catalog import ModelSpec
from lemonade_grpc.core.errors import (
    BackendCrashed,
    InsufficientMemory,
    InternalError,
    InvalidRequest,
    LemonadeError,
    LoadAbortedByShutdown,
    LoadCancelled,
    ModelEvicted,
    ModelNotFound,
    ModelNotLoaded,
    Overloaded,
    ShuttingDown,
    SlotsPinned,
    StateWriteFailed,
    exhausted_resource,
    server_resources_exhausted,
)
from lemonade_grpc.core.options import EffectiveOptions, RequestedOptions
from lemonade_grpc.core.settings import Limits, PoolSettings
from lemonade_grpc.core.tasks import TaskOwner, settle, wait_for_any
from lemonade_grpc.pool import policy
from lemonade_grpc.pool.admission import Admission
from lemonade_grpc.pool.events import (
    EventBus,
    LoadFailed,
    LoadPhase,
    LoadProgress,
    ModelLoaded,
    ModelStateChanged,
    ModelUnloaded,
    ModelUpdated,
    PinChanged,
    PoolWarning,
    UnloadReason,
)
from lemonade_grpc.pool.forecast import LoadForecast, Outcome
from lemonade_grpc.pool.jobs import JobKey, LoadJob, LoadOrigin, LoadResult
from lemonade_grpc.pool.memory import MemoryProbe, SystemMemory, mib
from lemonade_grpc.pool.model import Lease, Model, ModelState, ModelView, is_valid_transition
from lemonade_grpc.pool.observer import Attributes, PoolObserver
from lemonade_grpc.pool.pins import Pins, plan_restore
from lemonade_grpc.pool.views import MemoryView, PoolView, load_view, model_view, slot_views
from lemonade_grpc.pool.watchdog import CrashHistory, Watchdog
from lemonade_grpc.store.pin_file import PinStore

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


PLAN_ESTIMATES = 4


def _slots_pinned(spec: ModelSpec, plan: policy.NoRoom) -> SlotsPinned:
    return SlotsPinned(
        f"every {spec.type.value} slot is held by a pinned model ({', '.join(plan.pinned)});"
        f" unpin one to load {spec.name}"
    )


def _insufficient_memory(spec: ModelSpec, plan: policy.NotEnoughMemory) -> InsufficientMemory:
    return InsufficientMemory(
        f"{spec.name} needs about {mib(plan.need)} ({plan.need:,} bytes: model file and context);"
        f" {mib(plan.available)} is available, {mib(plan.reserve)} is kept in reserve"
        f" ([pool] memory_reserve_mb), and evicting every idle unpinned model would free"
        f" only {mib(plan.freeable)}"
    )


# Loads the pool starts itself, at most one per model at a time: never refused for a full queue.
INTERNAL_ORIGINS = frozenset({LoadOrigin.RESTART, LoadOrigin.RESTORE})


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
        pin_store: PinStore | None = None,
        memory: MemoryProbe | None = None,
        estimate: MemoryEstimator = file_size,
        observer: PoolObserver | None = None,
    ) -> None:
        self.catalog = dict(catalog)
        self.settings = settings
        self.limits = limits or Limits()
        # Set while a model may be READY: what the memory check waits for (`_watch_memory`).
        self._loaded = asyncio.Event()
        self.bus = bus or EventBus(
            subscriber_queue=self.limits.watch_queue_events,
            max_subscribers=self.limits.max_watch_streams,
            clock=clock,
        )
        self._launch = launch
        self._clock = clock
        self._memory: MemoryProbe = memory or SystemMemory()
        self._estimate = estimate
        self._observer = observer or PoolObserver()
        # Loads and stops: never cancelled by a client, awaited at shutdown.
        self._work = TaskOwner("pool")
        # Watchers and followers: cancelled at shutdown.
        self._background = TaskOwner("pool watchers")
        self._pins = Pins(pin_store, self._work, lambda problem: self._warn("STATE_WRITE_FAILED", problem))
        self._watchdog = Watchdog(settings, self._background, self._crashed)
        self._crashes = CrashHistory(settings, clock)
        self._admission = Admission(
            max_streams=self.limits.max_streams,
            max_streams_per_model=self.limits.max_streams_per_model,
            max_queued=self.limits.max_queued_streams,
        )
        self._memory_low = False
        self._lock = asyncio.Lock()
        # Plans' memory estimates (a file header read each, in a worker thread) at once, at most.
        self._estimates = asyncio.Semaphore(PLAN_ESTIMATES)
        self._models: dict[str, Model] = {}
        self._jobs: dict[JobKey, LoadJob] = {}
        self._waiting: list[LoadJob] = []
        self._current: LoadJob | None = None
        # Every task stopping a backend: the load path waits for all of them
        # before it starts a process.
        self._teardowns: set[asyncio.Task[Any]] = set()
        self._streams = 0
        self._no_streams = asyncio.Event()
        self._no_streams.set()
        # Set by `shutdown`: stops still giving requests their grace period end it now.
        self._hurry = asyncio.Event()
        self._backends_started = 0
        self._closing = False

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
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        spec = self.spec(name)
        opts.validate(requested, name, spec.allowed_args)
        running = self._ready(name)
        if running is not None:
            wanted = opts.resolve(requested, running.options, spec.defaults)
            if policy.changes_nothing(running.options, running.pinned, wanted, pinned):
                # Nothing is acted on, so no lock is needed; like any status,
                # the answer may go stale the moment it is sent.
                result = LoadResult(model_view(running), already_loaded=True, evicted=())
                settled = LoadJob.settled(name, result)
                self._observer.load_ended(settled, result, None)
                return settled
        job = LoadJob(name, requested, pinned, origin, self._clock())
        joined = self._jobs.get(job.key)
        if joined is not None and not joined.done:
            return joined
        if origin not in INTERNAL_ORIGINS:
            self._check_queue_room()
        self._jobs[job.key] = job
        self._waiting.append(job)
        position = self._queue_position(job)
        self._progress(
            job, LoadPhase.QUEUED, queue_position=position, attributes={"lemonade.queue_position": position}
        )
        job.task = self._work.spawn(self._run(job), f"load {name}")
        job.task.add_done_callback(lambda task: self._job_ended(job, task))
        return job

    def _check_queue_room(self) -> None:
        """`Overloaded` when `limits.max_queued_loads` loads already wait for the lock."""
        if len(self._waiting) >= self.limits.max_queued_loads:
            raise Overloaded(
                f"{len(self._waiting)} loads are already waiting for the load lock"
                f" ([limits] max_queued_loads = {self.limits.max_queued_loads}); try again later"
            )

    def _queue_position(self, job: LoadJob) -> int:
        return self._waiting.index(job) + (self._current is not None)

    async def _run(self, job: LoadJob) -> None:
        """A job's task: wait for the lock, load, settle the job with its result or error."""
        try:
            async with self._lock:
                self._waiting.remove(job)
                self._current = job
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
        if job in self._waiting:
            self._waiting.remove(job)
            self._announce_queue()
        if self._current is job:
            self._current = None
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]
        if not job.done:
            # Unload or shutdown cancelled it; what the load spawned is
            # stopped already (the launcher's contract), and the stops it
            # started have run to their end (`settle`).
            self._fail(job, job.cancel_error or LoadCancelled(f"load of {job.name} was cancelled"))

    def _fail(self, job: LoadJob, error: LemonadeError) -> None:
        job.finish(None, error)
        self._observer.load_ended(job, None, error)
        self.bus.publish(LoadFailed(job.name, error.reason, error.message))
        model = self._models.get(job.name)
        failed = model if model is not None and model.state is ModelState.FAILED else None
        plan = policy.after_failed_load(
            cancelled=isinstance(error, LoadCancelled | LoadAbortedByShutdown) or self._closing,
            ready=model is not None and model.state is ModelState.READY,
            pinned=failed is not None and failed.pinned,
            pin_in_force=job.pin_in_force,
            restart_pending=failed is not None and failed.restart_timer is not None,
            restart=job.origin is LoadOrigin.RESTART,
        )
        if plan is policy.FailedLoadPlan.RESTART:
            assert failed is not None
            self._schedule_restart(failed, f"could not be started ({error.reason})")
        elif plan is policy.FailedLoadPlan.UNPIN:
            if failed is not None:
                self._set_pin(failed, False)  # Status agrees with the pins file
            self._pins.drop(job.name)

    def _announce_queue(self) -> None:
        """Tell each waiting load its new place in the queue."""
        for job in self._waiting:
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
        self.bus.publish(progress)

    async def _load_locked(self, job: LoadJob) -> LoadResult:
        """The load path proper. Runs under the lock; every decision is taken here.

        Decisions are taken and acted on with no `await` between them, so no
        Pin, lease, stop or crash can slip in between a plan and its first
        step (issue #9 finding 15: memory victims were marked UNLOADING only
        after the slot victims had stopped, and a Pin in between was lost).
        """
        spec = self.catalog[job.name]
        await self._teardowns_done()
        while True:
            running = self._ready(job.name)
            # A pinned model that crashed keeps its pin and options while its
            # restart is pending: a Load or a request that comes first loads
            # it with them (absent fields keep the current options).
            crashed = self._awaiting_restart(job.name)
            base = running or crashed
            job.pin_in_force = base is not None and base.pinned
            wanted = opts.resolve(job.requested, base.options if base else None, spec.defaults)
            if running is not None and policy.reuses_process(running.options, wanted):
                result = self._reuse(job, running, wanted)
                await self._pins.flush()  # a pin set by this load is on disk when it answers
                return result
            need = await asyncio.to_thread(self._estimate, spec, wanted)  # reads the file's header
            await self._teardowns_done()  # stops that began meanwhile
            if self._ready(job.name) is running and self._awaiting_restart(job.name) is crashed:
                break  # nothing this decision rests on changed while we waited

        plan = self._placement(spec, need, self._memory.available_bytes())
        if isinstance(plan, policy.NoRoom):
            raise _slots_pinned(spec, plan)
        if isinstance(plan, policy.NotEnoughMemory):
            raise _insufficient_memory(spec, plan)
        pinned = job.pinned if job.pinned is not None else bool(base and base.pinned)
        previous = self._replaced(job.name)
        if previous is not None:
            self._stop(previous, UnloadReason.RELOAD)
        for victims, reason in (
            (plan.slot_victims, UnloadReason.EVICTED_LRU),
            (plan.memory_victims, UnloadReason.MEMORY_PRESSURE),
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
                    self._stop(self._models[victim], reason)
        await self._teardowns_done()
        return await self._start(job, spec, wanted, pinned)

    def _replaced(self, name: str) -> Model | None:
        """The entry of `name` a start replaces (stopped, reason RELOAD): a READY or FAILED one."""
        previous = self._models.get(name)
        return (
            previous
            if previous is not None and previous.state in (ModelState.READY, ModelState.FAILED)
            else None
        )

    def _placement(
        self, spec: ModelSpec, need: int, available: int
    ) -> policy.LoadPlan | policy.NoRoom | policy.NotEnoughMemory:
        """Where a load of `spec` needing `need` bytes fits with `available` bytes free now.

        The one decision `load` and `plan` share.
        """
        residents = [self._resident(m) for m in self._models.values() if m.state is ModelState.READY]
        return policy.plan_load(
            spec.name,
            spec.type,
            need,
            residents,
            self.settings.slots(spec.type),
            available=available,
            reserve=self.settings.memory_reserve_bytes,
        )

    async def plan(self, name: str, requested: RequestedOptions, pinned: bool | None = None) -> LoadForecast:
        """What `load(name, requested, pinned)` would do now, without doing it (issue 12).

        Raises what `load` raises at once for a request it refuses. Decided
        by the functions the load path runs, and at the same points of it:
        what changes nothing, what keeps the process, then the placement;
        a failure carries the load's own message.
        """
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        spec = self.spec(name)
        opts.validate(requested, name, spec.allowed_args)
        running = self._ready(name)
        base = running or self._awaiting_restart(name)
        wanted = opts.resolve(requested, base.options if base else None, spec.defaults)
        settled = running is not None and policy.changes_nothing(
            running.options, running.pinned, wanted, pinned
        )
        joined = self._jobs.get((name, requested, pinned, False))
        if not settled and (joined is None or joined.done):
            self._check_queue_room()  # the load would be refused at once
        told = functools.partial(
            LoadForecast,
            name,
            options=wanted,
            reserve_bytes=self.settings.memory_reserve_bytes,
            loads_ahead=len(self._waiting) + (self._current is not None),
        )
        if settled:
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
        freeing = sum(
            m.backend.process.rss_bytes()
            for m in self._models.values()
            if m.state is ModelState.UNLOADING and m.backend is not None
        )
        plan = self._placement(spec, need, available + freeing)
        if isinstance(plan, policy.NoRoom):
            return told(Outcome.SLOTS_PINNED, message=_slots_pinned(spec, plan).message)
        if isinstance(plan, policy.NotEnoughMemory):
            return told(
                Outcome.INSUFFICIENT_MEMORY, message=_insufficient_memory(spec, plan).message, need_bytes=need
            )
        evictions = tuple((victim, UnloadReason.EVICTED_LRU) for victim in plan.slot_victims) + tuple(
            (victim, UnloadReason.MEMORY_PRESSURE) for victim in plan.memory_victims
        )
        stops = [f"{victim} ({reason.value})" for victim, reason in evictions]
        reload = self._replaced(name) is not None
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

    async def _start(
        self, job: LoadJob, spec: ModelSpec, wanted: EffectiveOptions, pinned: bool
    ) -> LoadResult:
        """Start `spec`'s process and commit it READY. Under the lock, every stop settled."""
        model = Model(spec, wanted, ModelState.LOADING, pinned=pinned)
        self._enter(model)
        self._progress(job, LoadPhase.STARTING, "starting backend")

        def spawned(backend: Backend) -> None:
            model.backend = backend
            self._backends_started += 1
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
            self._set_state(
                model,
                ModelState.STOPPED,
                reason=UnloadReason.SHUTDOWN if shutdown else UnloadReason.REQUESTED,
            )
            raise
        except LemonadeError as error:
            self._set_state(model, ModelState.FAILED, message=error.message)
            raise
        except BaseException as error:
            shortage = exhausted_resource(error) if isinstance(error, Exception) else None
            what = server_resources_exhausted(shortage).message if shortage else "internal error"
            self._set_state(model, ModelState.FAILED, message=f"{what} ({type(error).__name__})")
            raise
        model.backend = backend
        model.loaded_at = model.last_used_at = self._clock()
        self._set_state(model, ModelState.READY)
        self._arm_idle(model)
        self._remember_pin(model)
        self._watchdog.watch(model)
        await self._pins.flush()  # a pinned load answers once its pin is on disk
        return LoadResult(model_view(model), already_loaded=False, evicted=tuple(job.evicted))

    def _reuse(self, job: LoadJob, running: Model, wanted: EffectiveOptions) -> LoadResult:
        """Same process: only settings that need no restart change."""
        self._set_pin(running, job.pinned)
        self._update_options(running, wanted)
        self._remember_pin(running)
        return LoadResult(model_view(running), already_loaded=True, evicted=())

    def _update_options(self, model: Model, options: EffectiveOptions) -> None:
        """The one place a READY model's options change in place; publishes ModelUpdated.

        The event also ends, on Watch, the load that made the change (issue
        18 finding 11: such a load showed QUEUED and nothing after, and
        nothing said the options had changed).
        """
        model.options = options
        self._arm_idle(model)
        self.bus.publish(ModelUpdated(model_view(model)))

    def _resident(self, model: Model) -> policy.Resident:
        """What the eviction policy needs to know of `model`."""
        rss = model.backend.process.rss_bytes() if model.backend is not None else 0
        return policy.Resident(
            model.name, model.pinned, len(model.leases), model.last_used_at or 0.0, rss, model.type
        )

    async def _teardowns_done(self) -> None:
        """Wait until no backend is being stopped (cancellation waits too: `settle`)."""
        while self._teardowns:
            await settle(asyncio.ensure_future(asyncio.wait(set(self._teardowns))))

    # ----------------------------------------------------------- the states

    def _awaiting_restart(self, name: str) -> Model | None:
        """`name`'s model if it is pinned and FAILED: crashed, its restart pending."""
        model = self._models.get(name)
        return model if model is not None and model.state is ModelState.FAILED and model.pinned else None

    def _ready(self, name: str) -> Model | None:
        model = self._models.get(name)
        return model if model is not None and model.state is ModelState.READY else None

    def _enter(self, model: Model) -> None:
        """Put a new LOADING `model` in the pool (its name must be free) and say so."""
        assert model.state is ModelState.LOADING
        assert model.name not in self._models
        self._models[model.name] = model
        log.debug("%s: loading", model.name)
        self.bus.publish(ModelStateChanged(model.name, ModelState.LOADING))

    def _set_state(
        self, model: Model, state: ModelState, *, reason: UnloadReason | None = None, message: str = ""
    ) -> None:
        """The one place a model's state changes; publishes the event of the change.

        READY: ModelLoaded. A READY model's FAILED: ModelUnloaded (CRASHED).
        STOPPED: ModelUnloaded (`reason`), and the model leaves the pool.
        UNLOADING, and FAILED while loading: ModelStateChanged.
        """
        old = model.state
        if not is_valid_transition(old, state):
            raise AssertionError(f"{model.name}: invalid transition {old} -> {state}")
        model.state = state
        pid = model.backend.pid if model.backend is not None else 0
        why = f" ({reason.value})" if reason else ""
        log.debug("%s: %s -> %s%s", model.name, old.value, state.value, why)
        if state is ModelState.READY:
            self._loaded.set()
            self.bus.publish(ModelLoaded(model_view(model)))
        elif state is ModelState.FAILED and old is ModelState.READY:
            model.crash_reported = True
            self._observer.unloaded(model.name, UnloadReason.CRASHED, pid, message)
            self.bus.publish(ModelUnloaded(model.name, UnloadReason.CRASHED, pid, message))
        elif state is ModelState.STOPPED:
            if self._models.get(model.name) is model:
                del self._models[model.name]
            if not model.crash_reported:
                self._observer.unloaded(model.name, reason or UnloadReason.REQUESTED, pid, message)
            self.bus.publish(ModelUnloaded(model.name, reason or UnloadReason.REQUESTED, pid, message))
        else:
            self.bus.publish(ModelStateChanged(model.name, state, reason, message))

    def _set_pin(self, model: Model, pinned: bool | None) -> None:
        """Apply a tri-state pin (None keeps it); publish when it changes."""
        if pinned is not None and pinned != model.pinned:
            model.pinned = pinned
            self.bus.publish(PinChanged(model.name, pinned))
            self._arm_idle(model)

    def _remember_pin(self, model: Model) -> None:
        """Keep READY `model`'s pin and options in the state file, or drop it when unpinned."""
        if model.pinned and model.state is ModelState.READY:
            self._pins.keep(model.name, model.options)
        else:
            self._pins.drop(model.name)

    # ---------------------------------------------------------------- stops

    def _stop(
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
        self._set_state(model, ModelState.UNLOADING, reason=reason)
        self._cancel_idle(model)
        if model.restart_timer is not None:
            model.restart_timer.cancel()
            model.restart_timer = None
        grace = self.settings.evict_grace_seconds if lease_grace is None else lease_grace
        model.stopping = self._teardown(self._finish_stop(model, reason, grace), f"stop {model.name}")
        return model.stopping

    def _teardown(self, work: Any, name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = self._work.spawn(work, name)
        self._teardowns.add(task)
        task.add_done_callback(self._teardowns.discard)
        return task

    async def _finish_stop(self, model: Model, reason: UnloadReason, grace: float) -> None:
        try:
            if model.leases:
                await wait_for_any([model.no_leases, self._hurry], grace)
                if model.leases:
                    # A stop begun before the signal (an Unload, an eviction)
                    # whose grace the shutdown cut short ends its requests
                    # for the shutdown's sake: UNAVAILABLE, not "retry".
                    error: LemonadeError = (
                        ShuttingDown("the server is shutting down")
                        if reason is UnloadReason.SHUTDOWN or self._hurry.is_set()
                        else ModelEvicted(f"{model.name} was unloaded ({reason.value}) during the request")
                    )
                    self._revoke(model, error)
            if model.backend is not None:
                status = await model.backend.stop(self.settings.stop_grace_seconds)
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
            self._set_state(model, ModelState.STOPPED, reason=reason)

    @staticmethod
    def _revoke(model: Model, error: LemonadeError) -> None:
        """Mark every lease on `model` as ended by `error` (their streams break next)."""
        for lease in list(model.leases):
            lease.revoke(error)

    # -------------------------------------------------------------- crashes

    def _crashed(self, model: Model, message: str) -> None:
        """Mark READY `model` crashed: its requests end BACKEND_CRASHED; a pinned one is restarted.

        Does nothing when `model` is no longer the current READY one (a
        stale watcher: it was reloaded, unloaded or is being stopped).
        """
        if self._models.get(model.name) is not model or model.state is not ModelState.READY:
            return
        backend = model.backend
        assert backend is not None
        self._revoke(model, BackendCrashed(f"the backend of {model.name} {message}"))
        self._cancel_idle(model)
        log.debug("%s: backend pid %d %s", model.name, backend.pid, message)
        self._set_state(model, ModelState.FAILED, message=message)
        backend.process.kill_group()  # exited: its group's leftovers; hung: no grace
        self._teardown(backend.stop(0), f"clean up {model.name}")
        if model.pinned and not self._closing:
            self._schedule_restart(model, "crashed")

    def refused(self, name: str, lease: Lease) -> None:
        """`lease`'s backend refused a connection: it died before the watchdog saw it exit.

        A READY backend always listens; one that refuses is gone, or as good
        as gone. Marked crashed now (its other requests end, a pinned one is
        restarted) so that the next lease loads it anew instead of meeting
        the same refusal. Does nothing when `lease` holds an older backend.
        """
        model = self._ready(name)
        if model is not None and model.backend is lease.backend:
            self._crashed(model, "refused a connection")

    def _schedule_restart(self, model: Model, what: str) -> None:
        """Restart pinned FAILED `model` after its backoff, or give up when it keeps failing.

        `what` happened to it, for the warning ("crashed"). Each call counts
        toward `max_restarts` within `restart_window_seconds`.
        """
        count, delay = self._crashes.record(model.name)
        if delay is None:
            self._set_pin(model, False)
            self._pins.drop(model.name)
            window = self.settings.restart_window_seconds
            self._warn(
                "RESTARTS_EXHAUSTED",
                f"{model.name} crashed {count} times within {window:g} s:"
                " it is not restarted again and is no longer pinned; Load it to try again",
                model.name,
            )
            return
        self._warn(
            "RESTART_SCHEDULED",
            f"{model.name} {what}; restarting it in {delay:g} s with its pin and options",
            model.name,
        )
        model.restart_timer = asyncio.get_running_loop().call_later(
            delay, self._restart, model, context=contextvars.Context()
        )

    def _restart(self, model: Model) -> None:
        model.restart_timer = None
        if self._closing or self._models.get(model.name) is not model or model.state is not ModelState.FAILED:
            return  # unloaded or loaded again meanwhile
        try:
            job = self.load(model.name, opts.requesting(model.options), True, origin=LoadOrigin.RESTART)
        except LemonadeError as error:
            self._restart_failed(model.name, error)
            return
        self._observer.restarting(model.name)

        async def follow() -> None:
            # What becomes of the pin is `_fail`'s decision, as for any load.
            try:
                await job.outcome()
            except (LoadCancelled, LoadAbortedByShutdown):
                pass
            except LemonadeError as error:
                log.warning("%s: restart failed: %s", job.name, error.message)

        self._background.spawn(follow(), f"restart {model.name}")

    def _restart_failed(self, name: str, error: LemonadeError) -> None:
        model = self._models.get(name)
        if model is not None:
            self._set_pin(model, False)  # Status agrees with the pins file
        self._pins.drop(name)
        self._warn("RESTART_FAILED", f"{name} could not be restarted: {error.message}", name)

    # ------------------------------------------------------------ idle unload

    def _arm_idle(self, model: Model) -> None:
        """(Re)start `model`'s idle countdown if it may be idle-unloaded, else stop it (DESIGN.md item 6)."""
        self._cancel_idle(model)
        seconds = model.options.idle_seconds(self.settings.idle_unload_seconds)
        if seconds <= 0 or model.pinned or model.leases or model.state is not ModelState.READY:
            return
        model.idle_unload_at = self._clock() + seconds
        # The pool's timer, not the last request's: its own context (no request's trace in its log line).
        model.idle_timer = asyncio.get_running_loop().call_later(
            seconds, self._idle_expired, model, context=contextvars.Context()
        )

    @staticmethod
    def _cancel_idle(model: Model) -> None:
        if model.idle_timer is not None:
            model.idle_timer.cancel()
        model.idle_timer = None
        model.idle_unload_at = None

    def _idle_expired(self, model: Model) -> None:
        # A cancelled timer never fires: a request, a pin or a stop since it
        # was armed replaced or cancelled it. Checked again all the same.
        model.idle_timer = None
        if self._ready(model.name) is model and not model.leases and not model.pinned:
            self._stop(model, UnloadReason.IDLE)

    # ---------------------------------------------------------------- memory

    async def _watch_memory(self) -> None:
        """Every `memory_check_seconds`, evict unpinned models while memory is below the reserve.

        Only while a model is READY (there is nothing to evict otherwise): a
        server with nothing loaded never wakes up for it (issue 13, idle CPU).
        """
        while True:
            await self._loaded.wait()
            await asyncio.sleep(self.settings.memory_check_seconds)
            if not any(m.state is ModelState.READY for m in self._models.values()):
                self._loaded.clear()  # set again by the next READY
                continue
            available = self._memory.available_bytes()
            if available >= self.settings.memory_reserve_bytes:
                self._memory_low = False
            else:
                self._relieve_memory(available)

    def _relieve_memory(self, available: int) -> None:
        """Stop unpinned models, idle before busy, least recently used first, until the reserve is free."""
        reserve = self.settings.memory_reserve_bytes
        ready = [self._resident(m) for m in self._models.values() if m.state is ModelState.READY]
        freeing = sum(
            m.backend.process.rss_bytes()
            for m in self._models.values()
            if m.state is ModelState.UNLOADING and m.backend is not None
        )
        plan = policy.relieve_pressure(available, reserve, ready, freeing=freeing)
        if plan.short is not None and not self._memory_low:
            self._warn(
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
            self._stop(self._models[victim], UnloadReason.MEMORY_PRESSURE)

    # ----------------------------------------------------------- persistence

    def start(self, *, restore: bool = True) -> None:
        """Start background work: the memory check and, with `restore`, loading the saved pins.

        Call once the server listens: restored models load in the background,
        through the same locked path as any Load, and Status shows them.
        """
        if self.settings.memory_check_seconds > 0:
            self._background.spawn(self._watch_memory(), "memory check")
        if restore:
            self._restore_pins()

    def _restore_pins(self) -> None:
        saved, problem = self._pins.read_saved()
        if problem is not None:
            log.warning("pins: %s", problem)
            self._warn("STATE_FILE_CORRUPT", problem)
        plan = plan_restore(saved, self.catalog, self.settings.max_loaded)
        for name in plan.restore:
            self._pins.keep(name, saved[name])
        if plan.dropped:
            self._pins.drop(*plan.dropped)
            self._warn(
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
            self._warn_not_restored(job.name, error)

    def _warn_not_restored(self, name: str, error: LemonadeError) -> None:
        self._warn(
            "PIN_NOT_RESTORED", f"{name} could not be loaded again ({error.reason}): {error.message}", name
        )

    def _warn(self, code: str, message: str, *models: str) -> None:
        self.bus.publish(PoolWarning(code, message, tuple(models)))

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
        model = self._models.get(name)
        if model is None or model.state is not ModelState.READY:
            state = "not loaded" if model is None else model.state.value
            raise ModelNotLoaded(f"{name} is {state}; Load it with pinned = true to pin it once loaded")
        self._set_pin(model, pinned)
        self._remember_pin(model)
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
        jobs = [job for job in self._jobs.values() if job.name in names and job.task and not job.task.done()]
        for job in jobs:
            job.cancel_error = LoadCancelled(f"load of {job.name} was cancelled by an Unload")
            assert job.task is not None
            job.task.cancel()
        models = [m for m in self._models.values() if m.name in names and m.state is not ModelState.LOADING]
        stops = [self._stop(m, UnloadReason.REQUESTED) for m in models]
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
        if self._closing:
            return
        self._closing = True
        for job in list(self._jobs.values()):
            if job.task is not None and not job.task.done():
                job.cancel_error = LoadAbortedByShutdown(
                    f"load of {job.name} stopped: the server is shutting down"
                )
                job.task.cancel()
        for model in self._models.values():
            self._cancel_idle(model)
            if model.restart_timer is not None:
                model.restart_timer.cancel()
                model.restart_timer = None
        self._admission.close()
        self.bus.close(ShuttingDown("the server is shutting down"))

    async def drain(self, seconds: float) -> None:
        """Wait up to `seconds` for the inference streams running to end."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_streams.wait(), seconds)

    async def shutdown(self) -> None:
        """End every load and stream and stop every backend (reason SHUTDOWN). Idempotent.

        Streams still running end with SHUTTING_DOWN. Pins stay saved: the
        next start loads them again.
        """
        self.begin_shutdown()
        self._hurry.set()
        while True:
            for model in list(self._models.values()):
                if model.state in (ModelState.READY, ModelState.FAILED):
                    self._stop(model, UnloadReason.SHUTDOWN, lease_grace=0)
            jobs = {job.task for job in self._jobs.values() if job.task is not None and not job.task.done()}
            pending = jobs | self._teardowns
            if not pending:
                break
            await asyncio.wait(pending)
        await self._background.close()
        await self._pins.flush()
        await self._work.close()

    def kill_now(self) -> None:
        """SIGKILL every backend's process group at once, without waiting. For a forced exit."""
        for model in list(self._models.values()):
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
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        self.spec(name)
        async with self._admission.admit(name):
            model = self._ready(name)
            if model is None:
                try:
                    await self.load(name, RequestedOptions(), None, origin=LoadOrigin.INFERENCE).outcome()
                except LoadAbortedByShutdown as error:
                    raise ShuttingDown(error.message) from None
                model = self._ready(name)
                if model is None:
                    raise ModelNotLoaded(f"{name} was unloaded before the request could start")
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            assert model.backend is not None
            lease = Lease(model.backend)
            model.leases.add(lease)
            model.no_leases.clear()
            self._streams += 1
            self._no_streams.clear()
            self._cancel_idle(model)
            model.last_used_at = self._clock()
            try:
                yield lease
            finally:
                model.leases.discard(lease)
                model.last_used_at = self._clock()
                self._streams -= 1
                if not self._streams:
                    self._no_streams.set()
                if not model.leases:
                    model.no_leases.set()
                    self._arm_idle(model)

    # ---------------------------------------------------------------- status

    def snapshot(self) -> PoolView:
        """The pool's state now. Never waits for the lock."""
        models = tuple(model_view(m) for m in sorted(self._models.values(), key=lambda m: m.name))
        streams = self._admission.view()
        return PoolView(
            models=models,
            slots=slot_views(models, self.settings.max_loaded),
            memory=self._memory_view(models),
            load_in_flight=load_view(self._current) if self._current else None,
            queue=tuple(load_view(job) for job in self._waiting),
            sequence=self.bus.last_sequence,
            backends_started=self._backends_started,
            streams_running=streams.running,
            streams_queued=streams.queued,
        )

    def _memory_view(self, models: tuple[ModelView, ...]) -> MemoryView:
        return MemoryView(
            self._memory.total_bytes(), self._memory.available_bytes(), sum(m.rss_bytes for m in models)
        )

    def model_view(self, name: str) -> ModelView | None:
        """The state of `name`, or None when it is not in the pool."""
        model = self._models.get(name)
        return model_view(model) if model is not None else None

    def views(self) -> Iterator[ModelView]:
        """Every model in the pool."""
        return (model_view(m) for m in list(self._models.values()))

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
