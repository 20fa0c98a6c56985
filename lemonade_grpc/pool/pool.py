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
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass

import psutil

from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.catalog import ModelSpec, ModelType
from lemonade_grpc.pool import options as opts
from lemonade_grpc.pool import policy
from lemonade_grpc.pool.errors import (
    BackendCrashed,
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
    UnloadReason,
)
from lemonade_grpc.pool.model import Lease, Model, ModelState, ModelView, is_valid_transition
from lemonade_grpc.pool.options import EffectiveOptions, RequestedOptions

log = logging.getLogger(__name__)

BackendStarter = Callable[[ModelSpec, EffectiveOptions], Awaitable[Backend]]


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
        from_inference: bool,
        started_at: float,
    ) -> None:
        self.key = key
        self.name = name
        self.requested = requested
        self.pinned = pinned
        self.from_inference = from_inference
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
        job = cls((name,), name, RequestedOptions(), None, False, 0.0)
        job._finish(result, None)
        return job

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
    ) -> None:
        self.catalog = dict(catalog)
        self.settings = settings
        self.bus = bus or EventBus(clock=clock)
        self._start_backend = start_backend
        self._clock = clock
        self._lock = asyncio.Lock()
        self._models: dict[str, Model] = {}
        self._jobs: dict[tuple[object, ...], LoadJob] = {}
        self._waiting: list[LoadJob] = []
        self._current: LoadJob | None = None
        self._generation = 0
        self._backends_started = 0
        self._closing = False
        self._watchers: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------- loads

    def load(
        self,
        name: str,
        requested: RequestedOptions,
        pinned: bool | None = None,
        *,
        from_inference: bool = False,
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
        job = LoadJob(key, name, requested, pinned, from_inference, self._clock())
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
            return LoadResult(self._view(running), already_loaded=True, evicted=())

        pinned = job.pinned if job.pinned is not None else bool(running and running.pinned)
        if current is not None:
            reason = UnloadReason.RELOAD if running is not None else UnloadReason.REQUESTED
            await self._stop_models([current], reason)

        residents = [
            policy.Resident(m.name, m.pinned, len(m.leases), m.last_used_at or 0.0)
            for m in self._models.values()
            if m.spec.type is spec.type and m.state in (ModelState.READY, ModelState.LOADING)
        ]
        plan = policy.choose_victims(residents, self.settings.max_loaded.get(spec.type, 1))
        if isinstance(plan, policy.NoRoom):
            raise SlotsPinned(
                f"every {spec.type.value} slot is held by a pinned model ({', '.join(plan.pinned)});"
                f" unpin one to load {job.name}"
            )
        if plan.victims:
            job.evicted.extend(plan.victims)
            self._progress(job, LoadPhase.EVICTING, f"evicting {', '.join(plan.victims)}")
            await self._stop_models([self._models[v] for v in plan.victims], UnloadReason.EVICTED_LRU)

        self._generation += 1
        model = Model(spec, wanted, ModelState.LOADING, self._generation, pinned=pinned)
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
        self.bus.publish(ModelLoaded(self._view(model)))
        self._watch_exit(model)
        return LoadResult(self._view(model), already_loaded=False, evicted=tuple(job.evicted))

    def _set_pin(self, model: Model, pinned: bool | None) -> None:
        """Apply a tri-state pin (None keeps it); publish when it changes."""
        if pinned is not None and pinned != model.pinned:
            model.pinned = pinned
            self.bus.publish(PinChanged(model.name, pinned))

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

    def _watch_exit(self, model: Model) -> None:
        """Report a backend that exits without being asked to (DESIGN.md item 8)."""
        backend = model.backend
        assert backend is not None
        generation = model.generation

        async def watch() -> None:
            status = await backend.process.wait()
            # A stale watcher (the model was reloaded or unloaded) finds another
            # generation or a state other than READY, and says nothing.
            current = self._models.get(model.name)
            if current is None or current.generation != generation or current.state is not ModelState.READY:
                return
            self._set_state(current, ModelState.FAILED)
            self._revoke(current, BackendCrashed(f"the backend of {model.name} exited with status {status}"))
            await backend.client.close()
            log.warning("%s: backend pid %d exited with status %d", model.name, backend.pid, status)
            self.bus.publish(
                ModelUnloaded(model.name, UnloadReason.CRASHED, backend.pid, f"exit status {status}")
            )

        task = asyncio.create_task(watch(), name=f"watch {model.name}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

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
        return self._view(model)

    # --------------------------------------------------------------- unloads

    async def unload(self, name: str = "") -> list[str]:
        """Stop `name` (every model when empty); return the names that were stopped.

        A load of that model queued or in flight is cancelled first, which kills
        what it spawned. Unloading a model that is not loaded is not an error:
        the result is then empty. Raises `ModelNotFound` for an unknown name.
        """
        if name:
            self._spec(name)
        names = {name} if name else set(self.catalog)
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

        After it, `load` raises `ShuttingDown`.
        """
        self._closing = True
        await self._cancel_jobs(set(self.catalog))
        async with self._lock:
            await self._stop_models(self._stoppable(set(self.catalog)), UnloadReason.SHUTDOWN)
        for task in list(self._watchers):
            task.cancel()

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
            await self.load(name, RequestedOptions(), None, from_inference=True).outcome()
            model = self._models.get(name)
            if model is None or model.state is not ModelState.READY or model.backend is None:
                raise ModelNotLoaded(f"{name} was unloaded before the request could start")
        assert model.backend is not None
        lease = Lease(model.backend)
        model.leases.add(lease)
        model.no_leases.clear()
        model.last_used_at = self._clock()
        try:
            yield lease
        finally:
            model.leases.discard(lease)
            if not model.leases:
                model.no_leases.set()
            model.last_used_at = self._clock()

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
        memory = psutil.virtual_memory()
        return PoolView(
            models=models,
            slots=tuple(slots),
            memory=MemoryView(int(memory.total), int(memory.available), sum(m.rss_bytes for m in models)),
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
            idle_unload_at=None,
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
