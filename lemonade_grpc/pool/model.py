"""A model's lifecycle: a handful of named states and the valid moves between them.

Only `ModelTable.set_state` changes `Model.state`; it checks `is_valid_transition`
and publishes the event of the change, so no state changes unseen (the habit
of llama-swap's `internal/process`).

    LOADING ──> READY ──> UNLOADING ──> STOPPED
       │  └──────────────────┘  ▲          ▲
       ├──> FAILED ─────────────┘          │
       └───────────────────────────────────┘   (a load cancelled before READY)
    READY ──> FAILED                             (its backend crashed or hung)

STOPPED is terminal: the model is out of the pool, its process gone.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.core.catalog import Capabilities, ModelSpec, ModelType
from lemonade_grpc.core.errors import LemonadeError
from lemonade_grpc.core.options import EffectiveOptions


class ModelState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"
    STOPPED = "stopped"


_TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    ModelState.LOADING: frozenset({ModelState.READY, ModelState.FAILED, ModelState.STOPPED}),
    ModelState.READY: frozenset({ModelState.UNLOADING, ModelState.FAILED}),
    ModelState.UNLOADING: frozenset({ModelState.STOPPED}),
    ModelState.FAILED: frozenset({ModelState.UNLOADING}),
    ModelState.STOPPED: frozenset(),
}


def is_valid_transition(old: ModelState, new: ModelState) -> bool:
    """Whether a model may move from `old` to `new`. Pure."""
    return new in _TRANSITIONS[old]


class Lease:
    """One request's hold on a READY model (the Ollama habit: a request is its lease).

    When the pool must take the model away while the request still runs
    (eviction after the grace period, a crash, shutdown), it calls `revoke`:
    `revoked` says why, and the request's backend stream is broken at once
    (through the `cut` registered with `on_revoke`), not when the process
    finally dies (a backend ignoring SIGTERM kept streaming for its whole
    stop grace). The request, seeing its stream break, ends with that error
    instead of guessing.
    """

    __slots__ = ("_cut", "backend", "revoked")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.revoked: LemonadeError | None = None
        self._cut: Callable[[], None] | None = None

    def on_revoke(self, cut: Callable[[], None]) -> None:
        """Register how to break the request's stream (its response's close); at once if revoked."""
        self._cut = cut
        if self.revoked is not None:
            cut()

    def revoke(self, error: LemonadeError) -> None:
        """End the request with `error` (the first reason wins) and break its stream now."""
        if self.revoked is None:
            self.revoked = error
            if self._cut is not None:
                self._cut()


@dataclass(eq=False)
class Model:
    """One model in the pool. Owned by the pool; read-only everywhere else.

    Each process started for a name gets a new `Model` (compared by
    identity), so a late event about an old process (its exit, say) is told
    apart from one about the current process and dropped.
    """

    spec: ModelSpec
    options: EffectiveOptions
    state: ModelState
    pinned: bool = False
    backend: Backend | None = None
    loaded_at: float | None = None
    last_used_at: float | None = None
    leases: set[Lease] = field(default_factory=set)
    # Set whenever `leases` is empty: what an eviction waits on.
    no_leases: asyncio.Event = field(default_factory=asyncio.Event)
    # The idle countdown, running while the model is READY, unpinned and
    # unused (DESIGN.md item 6); `idle_unload_at` is when it ends.
    idle_timer: asyncio.TimerHandle | None = None
    idle_unload_at: float | None = None
    # A pinned model's restart after a crash, while it waits out its backoff.
    restart_timer: asyncio.TimerHandle | None = None
    # The pool-owned task stopping it, once it is UNLOADING: every stop of
    # the same model joins it (stopping twice is one stop).
    stopping: asyncio.Task[None] | None = None
    # Its crash was reported as its unload: the stop that clears it away later is not a second one.
    crash_reported: bool = False

    def __post_init__(self) -> None:
        self.no_leases.set()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def type(self) -> ModelType:
        return self.spec.type


@dataclass(frozen=True, slots=True)
class ModelView:
    """A read-only copy of one model's state, for status and events."""

    name: str
    type: ModelType
    recipe: str
    state: ModelState
    pinned: bool
    options: EffectiveOptions
    pid: int
    port: int
    loaded_at: float | None
    last_used_at: float | None
    in_flight: int
    idle_unload_at: float | None
    rss_bytes: int
    capabilities: Capabilities
