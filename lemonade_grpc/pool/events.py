"""EventBus: every pool event, numbered, buffered, fanned out to subscribers.

Sequence numbers are gap-free and start at 1. A ring buffer keeps the most
recent events so that a subscriber can resume after a reconnect. Each
subscriber has a bounded queue: a full queue never blocks `publish` (a stalled
Watch must never slow the pool); the subscriber is marked as having missed
events and must resynchronise from a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lemonade_grpc.pool.model import ModelState, ModelView


class UnloadReason(enum.Enum):
    REQUESTED = "requested"
    EVICTED_LRU = "evicted_lru"
    IDLE = "idle"
    MEMORY_PRESSURE = "memory_pressure"
    CRASHED = "crashed"
    SHUTDOWN = "shutdown"
    RELOAD = "reload"


class LoadPhase(enum.IntEnum):
    """Phases of a load, in the order they happen."""

    QUEUED = 1
    EVICTING = 2
    STARTING = 3
    LOADING = 4
    READY = 5


@dataclass(frozen=True, slots=True)
class LoadProgress:
    model: str
    phase: LoadPhase
    fraction: float = -1.0
    message: str = ""
    queue_position: int = 0
    evicted: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelLoaded:
    model: ModelView


@dataclass(frozen=True, slots=True)
class ModelUnloaded:
    model: str
    reason: UnloadReason
    pid: int
    message: str = ""


@dataclass(frozen=True, slots=True)
class PinChanged:
    model: str
    pinned: bool


@dataclass(frozen=True, slots=True)
class LoadFailed:
    model: str
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class PoolWarning:
    code: str
    message: str
    models: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelStateChanged:
    """A model moved to a state no other event reports: LOADING, UNLOADING, or FAILED while loading.

    `reason` is set for UNLOADING (why it is being stopped).
    """

    model: str
    state: ModelState
    reason: UnloadReason | None = None
    message: str = ""


Event = LoadProgress | ModelLoaded | ModelUnloaded | PinChanged | LoadFailed | PoolWarning | ModelStateChanged


@dataclass(frozen=True, slots=True)
class Envelope:
    """An event with its sequence number and wall-clock time."""

    sequence: int
    time: float
    event: Event


class Subscription:
    """One subscriber's view of the bus. Iterate `drain()` after `wait()`.

    `overflowed` becomes true when the queue was full at a publish: the events
    after the last one delivered are lost to this subscriber, which must take
    a fresh snapshot and call `reset`.
    """

    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self._bus = bus
        self._queue: collections.deque[Envelope] = collections.deque()
        self._maxsize = maxsize
        self._ready = asyncio.Event()
        self.overflowed = False

    def _offer(self, envelope: Envelope) -> None:
        if self.overflowed:
            return
        if len(self._queue) >= self._maxsize:
            self.overflowed = True
            self._queue.clear()
        else:
            self._queue.append(envelope)
        self._ready.set()

    async def wait(self) -> None:
        """Wait until there is something to drain or the subscription overflowed."""
        await self._ready.wait()

    def drain(self) -> Iterator[Envelope]:
        """Yield and remove the queued events, oldest first."""
        self._ready.clear()
        while self._queue:
            yield self._queue.popleft()

    def reset(self) -> None:
        """Forget the overflow after the subscriber took a fresh snapshot."""
        self._queue.clear()
        self.overflowed = False
        self._ready.clear()

    def close(self) -> None:
        """Stop receiving events. Safe to call twice."""
        self._bus._subscribers.discard(self)


class EventBus:
    """Numbers, buffers and fans out events. Not thread-safe: loop thread only."""

    def __init__(
        self,
        *,
        history: int = 4096,
        subscriber_queue: int = 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ring: collections.deque[Envelope] = collections.deque(maxlen=history)
        self._subscribers: set[Subscription] = set()
        self._subscriber_queue = subscriber_queue
        self._clock = clock
        self.last_sequence = 0

    def publish(self, event: Event) -> Envelope:
        """Number `event`, keep it in the ring and offer it to every subscriber. Never blocks."""
        self.last_sequence += 1
        envelope = Envelope(self.last_sequence, self._clock(), event)
        self._ring.append(envelope)
        for subscriber in self._subscribers:
            subscriber._offer(envelope)
        return envelope

    def subscribe(self) -> Subscription:
        """A new subscription receiving every event published from now on."""
        subscription = Subscription(self, self._subscriber_queue)
        self._subscribers.add(subscription)
        return subscription

    def since(self, sequence: int) -> list[Envelope] | None:
        """Buffered events after `sequence`, or None when some of them are gone from the ring."""
        if sequence > self.last_sequence:
            return None  # from another run of the server: numbers restart at 1
        if sequence == self.last_sequence:
            return []
        if not self._ring or self._ring[0].sequence > sequence + 1:
            return None
        return [e for e in self._ring if e.sequence > sequence]
