"""Pool: which models are resident, decided under one lock.

The whole load path (decide, evict, spawn, wait until healthy, commit) runs
under `Pool._lock`, an `asyncio.Lock`, which is FIFO. Two loads can never leave
two processes for one model (Unsloth Studio #5161/#5401: an orphaned 86 GB
server OOM-killed the host), and the already-loaded decision can never race a
reload (Lemonade #1603/#1604: check-then-act reloaded a 68 GB model).

Reads (`snapshot`) and inference on a READY model (`lease`) never take the
lock. The pool never imports grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.catalog import ModelSpec, ModelType
from lemonade_grpc.pool import options as opts
from lemonade_grpc.pool import policy
from lemonade_grpc.pool.errors import (
    BackendCrashed,
    InsufficientMemory,
    LoadCancelled,
    ModelEvicted,
    ModelNotFound,
    ModelNotLoaded,
    PoolError,
    ShuttingDown,
    SlotsPinned,
)
from lemonade_grpc.pool.events import (
    EventBus,
    LoadFailed,
    LoadPhase,
    LoadProgress,
    ModelLoaded,
    ModelUnloaded,
    PinChanged,
    PoolWarning,
    UnloadReason,
)
from lemonade_grpc.pool.memory import MemoryProbe, SystemMemory, mib
from lemonade_grpc.pool.model import Lease, Model, ModelState, ModelView, is_valid_transition
from lemonade_grpc.pool.options import EffectiveOptions, RequestedOptions
from lemonade_grpc.pool.state import PinStore

log = logging.getLogger(__name__)

BackendStarter = Callable[[ModelSpec, EffectiveOptions], Awaitable[Backend]]
MemoryEstimator = Callable[[ModelSpec, EffectiveOptions], int]


def file_size(spec: ModelSpec, options: EffectiveOptions) -> int:
    """The simplest memory estimate: the model file's size."""
    try:
        return spec.path.stat().st_size
    except OSError:
        return 0


class LoadOrigin(enum.Enum):
    """Who asked for a load."""

    REQUEST = "request"  # a Load call
    INFERENCE = "inference"  # a request for a model that was not loaded
    RESTORE = "restore"  # a pin saved by the previous run, at boot
    RESTART = "restart"  # a pinned model, after its backend crashed


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Pool limits and timings (the `[pool]` table of the config)."""

    max_loaded: Mapping[ModelType, int]
    idle_unload_seconds: int = 0
    health_timeout_seconds: float = 120.0
    stop_grace_seconds: float = 5.0
    # How long requests still using a model being unloaded may run before
    # they are ended with MODEL_EVICTED.
    evict_grace_seconds: float = 10.0
    # Memory kept free for everything else on the host: a load must fit
    # above it, and falling below it evicts (MEMORY_PRESSURE).
    memory_reserve_bytes: int = 512 << 20
    memory_check_seconds: float = 5.0  # 0 = no periodic check
    # A READY backend is asked GET /health this often; this many failures in
    # a row (or its exit, at once) is a crash.
    health_check_seconds: float = 5.0  # 0 = exits only
    health_check_failures: int = 3
    # A crashed pinned model is restarted after base, 2 base, 4 base ... up
    # to the cap; more than `max_restarts` crashes within the window and it
    # stays down.
    restart_backoff_seconds: float = 1.0
    restart_backoff_max_seconds: float = 60.0
    max_restarts: int = 5
    restart_window_seconds: float = 600.0


@dataclass(frozen=True, slots=True)
class LoadView:
    model: str
    phase: LoadPhase
    fraction: float
    started_at: float
    waiters: int


@dataclass(frozen=True, slots=True)
class SlotView:
    type: ModelType
    max_loaded: int
    used: int
    pinned: int


@dataclass(frozen=True, slots=True)
class MemoryView:
    total_bytes: int
    available_bytes: int
    backends_rss_bytes: int


@dataclass(frozen=True, slots=True)
class PoolView:
    """A snapshot of the whole pool, consistent as of `sequence`."""

    models: tuple[ModelView, ...]
    slots: tuple[SlotView, ...]
    memory: MemoryView
    load_in_flight: LoadView | None
    queue: tuple[LoadView, ...]
    sequence: int
    backends_started: int


@dataclass(frozen=True, slots=True)
class LoadResult:
    """How a load ended when it ended well."""

    model: ModelView
    already_loaded: bool
    evicted: tuple[str, ...]


class LoadJob:
    """One load, queued or running. Identical concurrent requests share it.

    `follow` replays the progress so far and then streams the rest, so a
    request that joins late still sees every phase (DESIGN.md item 3).
    """

    def __init__(
        self,
        key: tuple[object, ...],
        name: str,
        requested: RequestedOptions,
        pinned: bool | None,
        origin: LoadOrigin,
        started_at: float,
    ) -> None:
        self.key = key
        self.name = name
        self.requested = requested
        self.pinned = pinned
        self.origin = origin
        self.started_at = started_at
        self.waiters = 1
        self.history: list[LoadProgress] = []
        self.evicted: list[str] = []
        self.task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._result: LoadResult | None = None
        self._error: PoolError | None = None
        self._done = False

    @classmethod
    def settled(cls, name: str, result: LoadResult) -> LoadJob:
        """A job that is over before it began: the request needed nothing done."""
        job = cls((name,), name, RequestedOptions(), None, LoadOrigin.REQUEST, 0.0)
        job._finish(result, None)
        return job

    @property
    def from_inference(self) -> bool:
        return self.origin is LoadOrigin.INFERENCE

    @property
    def phase(self) -> LoadPhase:
        return self.history[-1].phase if self.history else LoadPhase.QUEUED

    @property
    def fraction(self) -> float:
        return self.history[-1].fraction if self.history else -1.0

    @property
    def done(self) -> bool:
        return self._done

    def _emit(self, progress: LoadProgress) -> None:
        self.history.append(progress)
        self._wake_all()

    def _finish(self, result: LoadResult | None, error: PoolError | None) -> None:
        self._result, self._error, self._done = result, error, True
        self._wake_all()

    def _wake_all(self) -> None:
        # Every settled state wakes every waiter: replace the event so that
        # followers waiting on the old one all run.
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    async def follow(self) -> AsyncIterator[LoadProgress]:
        """Yield every progress message, from the first, until the load ends.

        Does not yield the READY message: call `outcome` after the iteration.
        """
        index = 0
        while True:
            wake = self._wake
            while index < len(self.history):
                yield self.history[index]
                index += 1
            if self._done:
                return
            await wake.wait()

    async def outcome(self) -> LoadResult:
        """Wait for the load to end; return its result or raise its `PoolError`."""
        while not self._done:
            await self._wake.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class Pool:
    """The set of resident models and the one lock that changes it.

    Public methods are called from the event loop's thread only.
    """

    def __init__(
        self,
        catalog: Mapping[str, ModelSpec],
        settings: PoolSettings,
        start_backend: BackendStarter,
        *,
        bus: EventBus | None = None,
        clock: Callable[[], float] = time.time,
        pin_store: PinStore | None = None,
        memory: MemoryProbe | None = None,
        estimate: MemoryEstimator = file_size,
    ) -> None:
        self.catalog = dict(catalog)
        self.settings = settings
        self.bus = bus or EventBus(clock=clock)
        self._start_backend = start_backend
        self._clock = clock
        self._store = pin_store
        self._memory: MemoryProbe = memory or SystemMemory()
        self._estimate = estimate
        # Pinned models and their options, in the order they were pinned:
        # what `_store` holds once `_save_pins` has run.
        self._pins: dict[str, EffectiveOptions] = {}
        self._saved_pins: dict[str, EffectiveOptions] | None = None
        self._crashes: dict[str, list[float]] = {}
        self._memory_low = False
        self._lock = asyncio.Lock()
        self._models: dict[str, Model] = {}
        self._jobs: dict[tuple[object, ...], LoadJob] = {}
        self._waiting: list[LoadJob] = []
        self._current: LoadJob | None = None
        self._backends_started = 0
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()

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

        Raises `ModelNotFound`, `InvalidOptions` or `ShuttingDown` at once;
        every other failure is raised by `LoadJob.outcome`. An identical
        request already queued or running is joined instead of repeated.
        The job runs to its end even if nobody follows it; only `unload` or
        `shutdown` cancel it.
        """
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        spec = self._spec(name)
        opts.validate(requested)
        from_inference = origin is LoadOrigin.INFERENCE
        running = self._models.get(name)
        if (
            running is not None
            and running.state is ModelState.READY
            and (from_inference or opts.resolve(requested, running.options, spec.defaults) == running.options)
            and (pinned is None or pinned == running.pinned)
        ):
            # Nothing to change: answer at once, without queueing behind another
            # model's load. Nothing is acted on, so no lock is needed; like any
            # status, the answer may go stale the moment it is sent.
            return LoadJob.settled(name, LoadResult(self._view(running), already_loaded=True, evicted=()))
        key = (name, requested, pinned, from_inference)
        job = self._jobs.get(key)
        if job is not None and not job.done:
            job.waiters += 1
            return job
        job = LoadJob(key, name, requested, pinned, origin, self._clock())
        self._jobs[key] = job
        self._waiting.append(job)
        self._progress(job, LoadPhase.QUEUED, queue_position=self._queue_position(job))
        job.task = asyncio.create_task(self._run(job), name=f"load {name}")
        return job

    def _queue_position(self, job: LoadJob) -> int:
        return self._waiting.index(job) + (self._current is not None)

    async def _run(self, job: LoadJob) -> None:
        try:
            async with self._lock:
                self._waiting.remove(job)
                self._current = job
                self._announce_queue()
                result = await self._load_locked(job)
        except PoolError as error:
            self._fail(job, error)
        except asyncio.CancelledError:
            # Unload or shutdown cancelled us; the spawned process, if any, is
            # already stopped by _load_locked.
            if job in self._waiting:
                self._waiting.remove(job)
            self._fail(job, LoadCancelled(f"load of {job.name} was cancelled"))
        else:
            job._finish(result, None)
        finally:
            if self._current is job:
                self._current = None
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]

    def _fail(self, job: LoadJob, error: PoolError) -> None:
        job._finish(None, error)
        self.bus.publish(LoadFailed(job.name, error.reason, error.message))
        # A pin is kept only while its model is loaded: a model that fails to
        # load must not be retried at every boot (DESIGN.md item 5). A restart
        # after a crash has its own rules (`_schedule_restart`), and a
        # cancelled load says nothing about the model.
        if job.origin is not LoadOrigin.RESTART and not isinstance(error, LoadCancelled):
            model = self._models.get(job.name)
            if model is None or model.state is not ModelState.READY:
                self._forget_pin(job.name)

    def _announce_queue(self) -> None:
        """Tell each waiting load its new place in the queue."""
        for job in self._waiting:
            position = self._queue_position(job)
            if job.history[-1].queue_position != position:
                self._progress(job, LoadPhase.QUEUED, queue_position=position)

    def _progress(
        self,
        job: LoadJob,
        phase: LoadPhase,
        message: str = "",
        *,
        fraction: float = -1.0,
        queue_position: int = 0,
    ) -> None:
        progress = LoadProgress(job.name, phase, fraction, message, queue_position, tuple(job.evicted))
        job._emit(progress)
        self.bus.publish(progress)

    async def _load_locked(self, job: LoadJob) -> LoadResult:
        """The load path proper. Runs under the lock; every decision is taken here."""
        spec = self._spec(job.name)
        current = self._models.get(job.name)
        running = current if current is not None and current.state is ModelState.READY else None
        wanted = opts.resolve(job.requested, running.options if running else None, spec.defaults)
        if running is not None and (
            job.from_inference or running.options.process_key() == wanted.process_key()
        ):
            # Same process: only settings that need no restart change. A load
            # triggered by inference never reloads a model that is up.
            if not job.from_inference:
                running.options = wanted
            self._set_pin(running, job.pinned)
            self._arm_idle(running)
            self._remember_pin(running)
            return LoadResult(self._view(running), already_loaded=True, evicted=())

        pinned = job.pinned if job.pinned is not None else bool(running and running.pinned)
        if current is not None:
            reason = UnloadReason.RELOAD if running is not None else UnloadReason.REQUESTED
            await self._stop_models([current], reason)

        # Plan every eviction (slots, then memory) before carrying any out:
        # a load that cannot happen must not have evicted anything.
        need = await asyncio.to_thread(self._estimate, spec, wanted)  # reads the file's header
        residents = {
            m.name: self._resident(m)
            for m in self._models.values()
            if m.state in (ModelState.READY, ModelState.LOADING)
        }
        plan = policy.choose_victims(
            [r for r in residents.values() if self._models[r.name].spec.type is spec.type],
            self.settings.max_loaded.get(spec.type, 1),
        )
        if isinstance(plan, policy.NoRoom):
            raise SlotsPinned(
                f"every {spec.type.value} slot is held by a pinned model ({', '.join(plan.pinned)});"
                f" unpin one to load {job.name}"
            )
        memory_victims = self._plan_memory(job.name, need, residents, plan.victims)
        for victims, reason in (
            (plan.victims, UnloadReason.EVICTED_LRU),
            (memory_victims, UnloadReason.MEMORY_PRESSURE),
        ):
            if victims:
                job.evicted.extend(victims)
                self._progress(job, LoadPhase.EVICTING, f"evicting {', '.join(victims)} ({reason.value})")
                await self._stop_models([self._models[v] for v in victims], reason)

        model = Model(spec, wanted, ModelState.LOADING, pinned=pinned)
        self._models[job.name] = model
        self._progress(job, LoadPhase.STARTING, "starting backend")
        try:
            model.backend = await self._start_backend(spec, wanted)
            self._backends_started += 1
            self._progress(job, LoadPhase.LOADING, f"backend pid {model.backend.pid}: waiting for /health")
            await model.backend.wait_healthy(self.settings.health_timeout_seconds)
        except BaseException as error:
            # Whatever ends the load (failure, Unload, shutdown), what it
            # spawned must not outlive it.
            if model.backend is not None:
                await model.backend.stop(self.settings.stop_grace_seconds)
            if isinstance(error, PoolError):
                self._set_state(model, ModelState.FAILED)
            else:
                del self._models[job.name]
            raise
        now = self._clock()
        model.loaded_at = model.last_used_at = now
        self._set_state(model, ModelState.READY)
        self._arm_idle(model)
        self._remember_pin(model)
        self.bus.publish(ModelLoaded(self._view(model)))
        self._watch_backend(model)
        return LoadResult(self._view(model), already_loaded=False, evicted=tuple(job.evicted))

    def _resident(self, model: Model) -> policy.Resident:
        """What the eviction policy needs to know of `model`."""
        rss = model.backend.process.rss_bytes() if model.backend is not None else 0
        return policy.Resident(model.name, model.pinned, len(model.leases), model.last_used_at or 0.0, rss)

    def _plan_memory(
        self, name: str, need: int, residents: Mapping[str, policy.Resident], slot_victims: tuple[str, ...]
    ) -> tuple[str, ...]:
        """The idle models to stop so that `need` bytes fit; raise `InsufficientMemory` if none do."""
        reserve = self.settings.memory_reserve_bytes
        available = self._memory.available_bytes()
        idle = [
            resident
            for resident in residents.values()
            if resident.name not in slot_victims
            and resident.in_flight == 0
            and self._models[resident.name].state is ModelState.READY
        ]
        freed = sum(residents[v].rss_bytes for v in slot_victims)
        plan = policy.plan_memory(need, available, reserve, idle, freed=freed)
        if isinstance(plan, policy.NotEnoughMemory):
            raise InsufficientMemory(
                f"{name} needs about {mib(plan.need)} ({plan.need:,} bytes: model file and context);"
                f" {mib(plan.available)} is available, {mib(plan.reserve)} is kept in reserve"
                f" ([pool] memory_reserve_mb), and evicting every idle unpinned model would free"
                f" only {mib(plan.freeable)}"
            )
        return plan.victims

    def _set_pin(self, model: Model, pinned: bool | None) -> None:
        """Apply a tri-state pin (None keeps it); publish when it changes."""
        if pinned is not None and pinned != model.pinned:
            model.pinned = pinned
            self.bus.publish(PinChanged(model.name, pinned))
            self._arm_idle(model)

    def _set_state(self, model: Model, state: ModelState) -> None:
        """The one place a model's state changes."""
        if not is_valid_transition(model.state, state):
            raise AssertionError(f"{model.name}: invalid transition {model.state} -> {state}")
        log.info("%s: %s -> %s", model.name, model.state.value, state.value)
        model.state = state

    async def _stop_models(self, models: list[Model], reason: UnloadReason) -> None:
        """Stop `models` together and drop them from the pool; publish why. Under the lock.

        Every one is marked UNLOADING before anything is awaited, so no lease,
        pin or decision taken meanwhile sees it READY. Requests still using a
        model get `evict_grace_seconds` to finish, then end with MODEL_EVICTED.
        """
        was_running = {m for m in models if m.state is ModelState.READY}
        for model in models:
            self._set_state(model, ModelState.UNLOADING)
            self._cancel_idle(model)
            if model.restart_timer is not None:
                model.restart_timer.cancel()
                model.restart_timer = None
        await asyncio.gather(*(self._stop_one(m, reason, m in was_running) for m in models))

    async def _stop_one(self, model: Model, reason: UnloadReason, was_running: bool) -> None:
        if model.leases:
            try:
                await asyncio.wait_for(model.no_leases.wait(), self.settings.evict_grace_seconds)
            except TimeoutError:
                self._revoke(
                    model, ModelEvicted(f"{model.name} was unloaded ({reason.value}) during the request")
                )
        pid = model.backend.pid if model.backend else 0
        if model.backend is not None:
            status = await model.backend.stop(self.settings.stop_grace_seconds)
            log.info("%s: stopped pid %d (%s), exit status %d", model.name, pid, reason.value, status)
        if self._models.get(model.name) is model:
            del self._models[model.name]
        if was_running:  # a FAILED model's end was reported when it failed
            self.bus.publish(ModelUnloaded(model.name, reason, pid))

    @staticmethod
    def _revoke(model: Model, error: PoolError) -> None:
        """Mark every lease on `model` as ended by `error` (their streams break next)."""
        for lease in model.leases:
            lease.revoked = lease.revoked or error

    # -------------------------------------------------------------- watchdog

    def _watch_backend(self, model: Model) -> None:
        """Report a READY backend that exits (at once) or stops answering /health (DESIGN.md item 8)."""
        backend = model.backend
        assert backend is not None

        async def watch_exit() -> None:
            status = await backend.process.wait()
            if self._crashed(model, f"exited with status {status}"):
                await backend.stop(0)  # what is left of its group; closes the client

        async def watch_health() -> None:
            interval = self.settings.health_check_seconds
            failures = 0
            while self._models.get(model.name) is model and model.state is ModelState.READY:
                await asyncio.sleep(interval)
                failures = 0 if await backend.is_healthy(interval) else failures + 1
                if failures >= self.settings.health_check_failures:
                    message = f"stopped answering /health ({failures} checks in a row, {interval:g} s apart)"
                    if self._crashed(model, message):
                        await backend.stop(0)  # hung: no grace
                    return

        self._spawn(watch_exit(), f"watch exit {model.name}")
        if self.settings.health_check_seconds > 0:
            self._spawn(watch_health(), f"watch health {model.name}")

    def _crashed(self, model: Model, message: str) -> bool:
        """Mark READY `model` crashed: its requests end BACKEND_CRASHED; a pinned one is restarted.

        Returns False, doing nothing, when `model` is no longer the READY one
        (a stale watcher: it was reloaded, unloaded or is being stopped).
        """
        if self._models.get(model.name) is not model or model.state is not ModelState.READY:
            return False
        assert model.backend is not None
        pid = model.backend.pid
        self._set_state(model, ModelState.FAILED)
        self._cancel_idle(model)
        self._revoke(model, BackendCrashed(f"the backend of {model.name} {message}"))
        log.warning("%s: backend pid %d %s", model.name, pid, message)
        self.bus.publish(ModelUnloaded(model.name, UnloadReason.CRASHED, pid, message))
        if model.pinned and not self._closing:
            self._schedule_restart(model)
        return True

    def _schedule_restart(self, model: Model) -> None:
        """Restart pinned `model` after its backoff, or give up when it keeps crashing."""
        now = self._clock()
        crashes = self._crashes.setdefault(model.name, [])
        crashes.append(now)
        del crashes[: -(self.settings.max_restarts + 1)]
        delay = policy.restart_delay(
            crashes,
            now,
            base=self.settings.restart_backoff_seconds,
            cap=self.settings.restart_backoff_max_seconds,
            max_restarts=self.settings.max_restarts,
            window=self.settings.restart_window_seconds,
        )
        if delay is None:
            self._set_pin(model, False)
            self._forget_pin(model.name)
            window = self.settings.restart_window_seconds
            self._warn(
                "RESTARTS_EXHAUSTED",
                f"{model.name} crashed {len(crashes)} times within {window:g} s:"
                " it is not restarted again and is no longer pinned; Load it to try again",
                model.name,
            )
            return
        self._warn(
            "RESTART_SCHEDULED",
            f"{model.name} crashed; restarting it in {delay:g} s with its pin and options",
            model.name,
        )
        model.restart_timer = asyncio.get_running_loop().call_later(delay, self._restart, model)

    def _restart(self, model: Model) -> None:
        model.restart_timer = None
        if self._closing or self._models.get(model.name) is not model or model.state is not ModelState.FAILED:
            return  # unloaded or loaded again meanwhile
        job = self.load(model.name, _requested(model.options), True, origin=LoadOrigin.RESTART)

        async def follow() -> None:
            try:
                await job.outcome()
            except LoadCancelled:
                pass
            except PoolError as error:
                failed = self._models.get(job.name)
                if failed is not None and failed.state is ModelState.FAILED and failed.pinned:
                    log.warning("%s: restart failed: %s", job.name, error.message)
                    self._schedule_restart(failed)
                else:
                    self._forget_pin(job.name)
                    self._warn(
                        "RESTART_FAILED", f"{job.name} could not be restarted: {error.message}", job.name
                    )

        self._spawn(follow(), f"restart {model.name}")

    # ------------------------------------------------------------ idle unload

    def _arm_idle(self, model: Model) -> None:
        """(Re)start `model`'s idle countdown if it may be idle-unloaded, else stop it (DESIGN.md item 6)."""
        self._cancel_idle(model)
        seconds = model.options.idle_unload_seconds
        if seconds is None:
            seconds = self.settings.idle_unload_seconds
        if seconds <= 0 or model.pinned or model.leases or model.state is not ModelState.READY:
            return
        model.idle_unload_at = self._clock() + seconds
        model.idle_timer = asyncio.get_running_loop().call_later(seconds, self._idle_expired, model)

    @staticmethod
    def _cancel_idle(model: Model) -> None:
        if model.idle_timer is not None:
            model.idle_timer.cancel()
        model.idle_timer = None
        model.idle_unload_at = None

    def _idle_expired(self, model: Model) -> None:
        timer = model.idle_timer

        async def unload_idle() -> None:
            async with self._lock:
                # A request, a pin or a reload while we waited for the lock
                # cancelled or re-armed the countdown: then it is not ours to act on.
                if model.idle_timer is not timer or self._models.get(model.name) is not model:
                    return
                model.idle_timer = None
                await self._stop_models([model], UnloadReason.IDLE)

        self._spawn(unload_idle(), f"idle unload {model.name}")

    # ---------------------------------------------------------------- memory

    async def _watch_memory(self) -> None:
        """Every `memory_check_seconds`, evict unpinned models while memory is below the reserve."""
        while True:
            await asyncio.sleep(self.settings.memory_check_seconds)
            if self._memory.available_bytes() >= self.settings.memory_reserve_bytes:
                self._memory_low = False
                continue
            async with self._lock:
                await self._relieve_memory()

    async def _relieve_memory(self) -> None:
        """Stop unpinned models, idle before busy, least recently used first, until the reserve is free."""
        available = self._memory.available_bytes()
        reserve = self.settings.memory_reserve_bytes
        ready = [self._resident(m) for m in self._models.values() if m.state is ModelState.READY]
        plan = policy.plan_memory(0, available, reserve, ready)
        if isinstance(plan, policy.NotEnoughMemory):
            victims = tuple(r.name for r in ready if not r.pinned)
            if not self._memory_low:
                self._memory_low = True
                self._warn(
                    "MEMORY_LOW",
                    f"{mib(available)} available, below the reserve of {mib(reserve)}, and unpinned models"
                    f" free only {mib(plan.freeable)}; pinned models are kept",
                    *victims,
                )
        else:
            victims = plan.victims
        if victims:
            log.warning("memory: %s available, below %s: evicting %s", mib(available), mib(reserve), victims)
            await self._stop_models([self._models[v] for v in victims], UnloadReason.MEMORY_PRESSURE)

    # ----------------------------------------------------------- persistence

    def start(self, *, restore: bool = True) -> None:
        """Start background work: the memory check and, with `restore`, loading the saved pins.

        Call once the server listens: restored models load in the background,
        through the same locked path as any Load, and Status shows them.
        """
        if self.settings.memory_check_seconds > 0:
            self._spawn(self._watch_memory(), "memory check")
        if restore and self._store is not None:
            self._restore_pins(self._store)

    def _restore_pins(self, store: PinStore) -> None:
        saved, problem = store.read()
        self._saved_pins = dict(saved)
        if problem is not None:
            log.warning("pins: %s", problem)
            self._warn("STATE_FILE_CORRUPT", problem)
        unknown = [name for name in saved if name not in self.catalog]
        fit, left_out = policy.fit_pins(
            [(name, self.catalog[name].type) for name in saved if name in self.catalog],
            self.settings.max_loaded,
        )
        self._pins = {name: saved[name] for name in fit}
        self._save_pins()
        if unknown or left_out:
            reasons = [f"{name}: not in the catalog" for name in unknown] + [
                f"{name}: no free {self.catalog[name].type.value} slot"
                f" (max_loaded {self.settings.max_loaded.get(self.catalog[name].type, 1)})"
                for name in left_out
            ]
            self._warn(
                "PINS_NOT_RESTORED",
                "not loaded again, and no longer pinned: " + "; ".join(reasons),
                *unknown,
                *left_out,
            )
        for name in fit:
            job = self.load(name, _requested(saved[name]), True, origin=LoadOrigin.RESTORE)

            async def report(job: LoadJob = job) -> None:
                try:
                    await job.outcome()
                except PoolError as error:
                    self._warn(
                        "PIN_NOT_RESTORED",
                        f"{job.name} could not be loaded again ({error.reason}): {error.message}",
                        job.name,
                    )

            self._spawn(report(), f"restore {name}")
        log.info("pins: restoring %s", ", ".join(fit) or "none")

    def _remember_pin(self, model: Model) -> None:
        """Keep READY `model`'s pin and options in the state file, or drop it when unpinned."""
        if model.pinned and model.state is ModelState.READY:
            self._pins[model.name] = model.options
            self._save_pins()
        else:
            self._forget_pin(model.name)

    def _forget_pin(self, name: str) -> None:
        if self._pins.pop(name, None) is not None:
            self._save_pins()

    def _save_pins(self) -> None:
        """Write the pins if they changed. A failed write is reported, never raised."""
        if self._store is None or self._pins == self._saved_pins:
            return
        try:
            self._store.write(self._pins)
        except OSError as error:
            log.error("pins: cannot write %s: %s", self._store.path, error)
            self._warn("STATE_WRITE_FAILED", f"cannot save pins to {self._store.path}: {error}")
            return
        self._saved_pins = dict(self._pins)

    # ----------------------------------------------------------------- tasks

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run `work` in the background; shutdown cancels it."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _warn(self, code: str, message: str, *models: str) -> None:
        self.bus.publish(PoolWarning(code, message, tuple(models)))

    # ------------------------------------------------------------------ pins

    def pin(self, name: str, pinned: bool) -> ModelView:
        """Set the pin of a READY model; return its state. Safe to repeat.

        Takes no lock: the check and the change happen with no await between
        them, and a model chosen for eviction is already UNLOADING. Raises
        `ModelNotFound`, or `ModelNotLoaded` when the model is not READY.
        """
        self._spec(name)
        model = self._models.get(name)
        if model is None or model.state is not ModelState.READY:
            state = "not loaded" if model is None else model.state.value
            raise ModelNotLoaded(f"{name} is {state}; Load it with pinned = true to pin it once loaded")
        self._set_pin(model, pinned)
        self._remember_pin(model)
        return self._view(model)

    # --------------------------------------------------------------- unloads

    async def unload(self, name: str = "") -> list[str]:
        """Stop `name` (every model when empty); return the names that were stopped.

        A load of that model queued or in flight is cancelled first, which kills
        what it spawned. Unloading a model that is not loaded is not an error:
        the result is then empty. An unloaded model is no longer pinned. Raises
        `ModelNotFound` for an unknown name.
        """
        if name:
            self._spec(name)
        names = {name} if name else set(self.catalog)
        for unpinned in names:
            self._pins.pop(unpinned, None)
        self._save_pins()  # once, however many were unpinned
        cancelled = await self._cancel_jobs(names)
        stopped = {job.name for job in cancelled}
        async with self._lock:
            targets = self._stoppable(names)
            await self._stop_models(targets, UnloadReason.REQUESTED)
        return sorted(stopped | {m.name for m in targets})

    def _stoppable(self, names: set[str]) -> list[Model]:
        """The models of `names` in the pool and not already being stopped."""
        return [m for m in self._models.values() if m.name in names and m.state is not ModelState.UNLOADING]

    async def _cancel_jobs(self, names: set[str]) -> list[LoadJob]:
        """Cancel the loads of `names` and wait until each has cleaned up."""
        jobs = [
            job
            for job in self._jobs.values()
            if job.name in names and job.task is not None and not job.task.done()
        ]
        for job in jobs:
            assert job.task is not None
            job.task.cancel()
        await asyncio.gather(*(job.task for job in jobs if job.task), return_exceptions=True)
        return jobs

    async def shutdown(self) -> None:
        """Cancel every load and stop every backend (reason SHUTDOWN). Idempotent.

        After it, `load` raises `ShuttingDown`. Pins stay saved: the next
        start loads them again.
        """
        self._closing = True
        await self._cancel_jobs(set(self.catalog))
        async with self._lock:
            await self._stop_models(self._stoppable(set(self.catalog)), UnloadReason.SHUTDOWN)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def kill_now(self) -> None:
        """SIGKILL every backend's process group at once, without waiting. For a forced exit."""
        for model in list(self._models.values()):
            if model.backend is not None:
                model.backend.process.kill_group()

    # ------------------------------------------------------------- inference

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[Lease]:
        """Hold `name` for one request; load it first (catalog options) if needed.

        A READY model is leased without the lock. A model that is not READY
        is loaded through the locked path, joining a load in flight; a
        loaded model is never reloaded for inference. Raises what `load`
        and `LoadJob.outcome` raise, or `ModelNotLoaded` if the model went
        away between its load and the lease.
        """
        model = self._models.get(name)
        if model is None or model.state is not ModelState.READY:
            await self.load(name, RequestedOptions(), None, origin=LoadOrigin.INFERENCE).outcome()
            model = self._models.get(name)
            if model is None or model.state is not ModelState.READY or model.backend is None:
                raise ModelNotLoaded(f"{name} was unloaded before the request could start")
        assert model.backend is not None
        lease = Lease(model.backend)
        model.leases.add(lease)
        model.no_leases.clear()
        self._cancel_idle(model)
        model.last_used_at = self._clock()
        try:
            yield lease
        finally:
            model.leases.discard(lease)
            model.last_used_at = self._clock()
            if not model.leases:
                model.no_leases.set()
                self._arm_idle(model)

    # ---------------------------------------------------------------- status

    def snapshot(self) -> PoolView:
        """The pool's state now. Never waits for the lock."""
        models = tuple(self._view(m) for m in sorted(self._models.values(), key=lambda m: m.name))
        slots = []
        for model_type, limit in sorted(self.settings.max_loaded.items(), key=lambda kv: kv[0].value):
            holding = [
                m
                for m in models
                if m.type is model_type and m.state in (ModelState.READY, ModelState.LOADING)
            ]
            slots.append(SlotView(model_type, limit, len(holding), sum(m.pinned for m in holding)))
        memory = MemoryView(
            self._memory.total_bytes(), self._memory.available_bytes(), sum(m.rss_bytes for m in models)
        )
        return PoolView(
            models=models,
            slots=tuple(slots),
            memory=memory,
            load_in_flight=self._load_view(self._current) if self._current else None,
            queue=tuple(self._load_view(job) for job in self._waiting),
            sequence=self.bus.last_sequence,
            backends_started=self._backends_started,
        )

    def model_view(self, name: str) -> ModelView | None:
        """The state of `name`, or None when it is not in the pool."""
        model = self._models.get(name)
        return self._view(model) if model is not None else None

    def views(self) -> Iterator[ModelView]:
        """Every model in the pool."""
        return (self._view(m) for m in list(self._models.values()))

    def _view(self, model: Model) -> ModelView:
        backend = model.backend if model.state is not ModelState.FAILED else None
        return ModelView(
            name=model.name,
            type=model.spec.type,
            recipe=model.spec.recipe.value,
            state=model.state,
            pinned=model.pinned,
            options=model.options,
            pid=backend.pid if backend else 0,
            port=backend.port if backend else 0,
            loaded_at=model.loaded_at,
            last_used_at=model.last_used_at,
            in_flight=len(model.leases),
            idle_unload_at=model.idle_unload_at,
            rss_bytes=backend.process.rss_bytes() if backend else 0,
        )

    @staticmethod
    def _load_view(job: LoadJob) -> LoadView:
        return LoadView(job.name, job.phase, job.fraction, job.started_at, job.waiters)

    def _spec(self, name: str) -> ModelSpec:
        try:
            return self.catalog[name]
        except KeyError:
            raise ModelNotFound(
                f"no model named {name!r} in the catalog (known: {', '.join(sorted(self.catalog))})"
            ) from None


def _requested(options: EffectiveOptions) -> RequestedOptions:
    """A request for exactly `options` (every field present)."""
    return RequestedOptions(options.ctx_size, options.idle_unload_seconds, options.backend_args)
