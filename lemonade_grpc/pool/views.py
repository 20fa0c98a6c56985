"""Read-only copies of the pool's state, for Status, Watch snapshots and events.

Building a view never waits and never changes anything: Status and Watch
never take the load lock.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lemonade_grpc.core.catalog import ModelType
from lemonade_grpc.pool.events import LoadPhase
from lemonade_grpc.pool.jobs import LoadJob
from lemonade_grpc.pool.model import Model, ModelState, ModelView

if TYPE_CHECKING:
    from lemonade_grpc.backends.process import BackendProcess

# How old a backend's memory reading in a view may be. Reading it walks /proc
# for every thread of the process tree (0.2-0.4 ms for llama-server here): a
# third of a no-op Load's time, and once per model in every Status (issue 13).
# Eviction decisions do not use views: the pool reads memory afresh for them.
RSS_MAX_AGE_SECONDS = 0.5


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
    streams_running: int = 0
    streams_queued: int = 0


# States in which a model's process holds (or is about to hold) a slot.
HOLDS_SLOT = frozenset({ModelState.LOADING, ModelState.READY, ModelState.UNLOADING})


class RssSamples:
    """Each backend's resident memory, read again only once the last reading is `max_age` seconds old."""

    def __init__(
        self, max_age: float = RSS_MAX_AGE_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_age = max_age
        self._clock = clock
        self._samples: weakref.WeakKeyDictionary[BackendProcess, tuple[float, int]] = (
            weakref.WeakKeyDictionary()
        )

    def rss_bytes(self, process: BackendProcess) -> int:
        now = self._clock()
        sample = self._samples.get(process)
        if sample is not None and now - sample[0] < self._max_age:
            return sample[1]
        rss = process.rss_bytes()
        self._samples[process] = (now, rss)
        return rss


RSS = RssSamples()


def model_view(model: Model) -> ModelView:
    """A copy of `model`'s state, its backend's RSS at most `RSS_MAX_AGE_SECONDS` old."""
    backend = model.backend if model.state in HOLDS_SLOT else None
    return ModelView(
        name=model.name,
        type=model.type,
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
        rss_bytes=RSS.rss_bytes(backend.process) if backend else 0,
        capabilities=model.spec.capabilities,
    )


def load_view(job: LoadJob) -> LoadView:
    return LoadView(job.name, job.phase, job.fraction, job.started_at, job.waiters)


def slot_views(models: Iterable[ModelView], max_loaded: Mapping[ModelType, int]) -> tuple[SlotView, ...]:
    """Slot use per type: models loading, loaded or still stopping hold one."""
    models = list(models)
    slots = []
    for model_type, limit in sorted(max_loaded.items(), key=lambda kv: kv[0].value):
        holding = [m for m in models if m.type is model_type and m.state in HOLDS_SLOT]
        slots.append(SlotView(model_type, limit, len(holding), sum(m.pinned for m in holding)))
    return tuple(slots)
