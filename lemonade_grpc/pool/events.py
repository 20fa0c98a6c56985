"""EventBus: every pool event, numbered, buffered, fanned out to subscribers.

Sequence numbers are gap-free within a run and unique across runs. A ring
buffer, bounded in events and bytes, keeps the most recent events so that a
subscriber can resume after a reconnect. Each subscriber has a queue bounded
the same way: a full queue never blocks `publish` (a stalled
Watch must never slow the pool); the subscriber is marked as having missed
events and must resynchronise from a fresh snapshot.

Subscribers take turns (issue 13). A subscriber with something to deliver
waits in one FIFO queue of the bus and a pump admits at most
`turns_per_step` of them per pass of the event loop, so a thousand Watch
streams sending an event do not put a thousand steps ahead of everything
else in the loop's ready queue: a Load or a token stream running
meanwhile gets the loop between two batches instead of after the whole
fan-out (docs/performance.md, "Control plane", has the figures).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lemonade_grpc.core.errors import Overloaded
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
class ModelUpdated:
    """A READY model's options (and pin) changed in place; ends the load that changed them."""

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


Event = (
    LoadProgress
    | ModelLoaded
    | ModelUpdated
    | ModelUnloaded
    | PinChanged
    | LoadFailed
    | PoolWarning
    | ModelStateChanged
)


@dataclass(frozen=True, slots=True)
class Envelope:
    """An event with its sequence number and wall-clock time."""

    sequence: int
    time: float
    event: Event


# The ring of past events and each subscriber's queue are bounded in bytes as
# well as in count: a count alone let events carrying big arguments grow the
# server without end (issue 9, finding 11). An event's weight is the length of
# its repr, a fair measure of what it holds (its strings), taken once.
HISTORY_EVENTS = 4096
HISTORY_BYTES = 8 << 20
SUBSCRIBER_BYTES = 4 << 20
# Subscribers let through per pass of the event loop (see the module's doc).
TURNS_PER_STEP = 16


def weight(event: Event) -> int:
    """About how many bytes `event` holds."""
    return len(repr(event))


class Subscription:
    """One subscriber's view of the bus: `await wait()`, then `take()` one event (or `drain()` them all).

    `overflowed` becomes true when the queue was full (in events or bytes) at
    a publish: the events after the last one delivered are lost to this
    subscriber, which must take a fresh snapshot and call `reset`. `closed`
    is the exception to end the subscriber with once the bus is closed
    (the server is shutting down), else None.
    """

    def __init__(self, bus: EventBus, max_events: int, max_bytes: int) -> None:
        self._bus = bus
        self._queue: collections.deque[tuple[Envelope, int]] = collections.deque()
        self._bytes = 0
        self._max_events = max_events
        self._max_bytes = max_bytes
        self.overflowed = False
        self.closed: BaseException | None = None
        self._idle: asyncio.Future[None] | None = None  # its wait for a publish, to forget at `close`

    def _offer(self, envelope: Envelope, size: int) -> None:
        if self.overflowed:
            return
        if len(self._queue) >= self._max_events or self._bytes + size > self._max_bytes:
            self.overflowed = True
            self._queue.clear()
            self._bytes = 0
        else:
            self._queue.append((envelope, size))
            self._bytes += size

    def _close(self, error: BaseException) -> None:
        self.closed = error

    @property
    def ready(self) -> bool:
        """Whether `wait` has something to return for: an event queued, an overflow, or the end."""
        return bool(self._queue) or self.overflowed or self.closed is not None

    def wait(self) -> asyncio.Future[None]:
        """Await it: done when there is something to take, the subscription overflowed, or it is closed.

        Done in the subscriber's turn (see the module's doc), even when
        something is queued already; at once when closed. A future, not a
        coroutine: a thousand subscribers waiting hold nothing else.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        bus = self._bus
        if self.closed is not None:
            future.set_result(None)
        elif self.ready:
            bus._turns.append(future)  # cancelled: the pump skips it
            bus._pump_soon()
        else:
            # The publish that makes it ready queues it for its turn.
            bus._idle[future] = None
            self._idle = future
        return future

    def take(self) -> Envelope | None:
        """Remove and return the oldest queued event, or None."""
        if not self._queue:
            return None
        envelope, size = self._queue.popleft()
        self._bytes -= size
        return envelope

    def drain(self) -> Iterator[Envelope]:
        """Yield and remove the queued events, oldest first."""
        while (envelope := self.take()) is not None:
            yield envelope

    def reset(self) -> None:
        """Forget the overflow after the subscriber took a fresh snapshot."""
        self._queue.clear()
        self._bytes = 0
        self.overflowed = False

    def close(self) -> None:
        """Stop receiving events. Safe to call twice."""
        self._bus._subscribers.discard(self)
        if self._idle is not None:
            self._bus._idle.pop(self._idle, None)  # a subscriber gone while idle leaves nothing behind
            self._idle = None


class EventBus:
    """Numbers, buffers and fans out events. Not thread-safe: loop thread only.

    Sequence numbers are gap-free within a run and unique across runs: the
    first is the wall-clock time of the bus's creation in microseconds
    (`first_sequence`), so a number from an earlier run is below this run's
    range (and one from a later run, above it) and `since` answers None
    for it: the subscriber resynchronises instead of being sent the wrong
    events (issue 9, finding 21). About 1.8e15 today: within uint64, and
    within a JavaScript number's exact range (2^53) until the year 2255.
    """

    def __init__(
        self,
        *,
        history: int = HISTORY_EVENTS,
        history_bytes: int = HISTORY_BYTES,
        subscriber_queue: int = 1024,
        subscriber_bytes: int = SUBSCRIBER_BYTES,
        max_subscribers: int = 1024,
        clock: Callable[[], float] = time.time,
        first_sequence: int | None = None,
        turns_per_step: int = TURNS_PER_STEP,
    ) -> None:
        self._ring: collections.deque[tuple[Envelope, int]] = collections.deque()
        self._ring_bytes = 0
        self._history = history
        self._history_bytes = history_bytes
        self._subscribers: set[Subscription] = set()
        self._subscriber_queue = subscriber_queue
        self._subscriber_bytes = subscriber_bytes
        self._max_subscribers = max_subscribers
        self._clock = clock
        self._closed: BaseException | None = None
        # Subscribers waiting for the next publish (a dict: ordered, and a
        # cancelled waiter removes its own entry at once)...
        self._idle: dict[asyncio.Future[None], None] = {}
        # ... and those waiting for their turn, first come first served.
        self._turns: collections.deque[asyncio.Future[None]] = collections.deque()
        self._turns_per_step = turns_per_step
        self._pumping = False
        if first_sequence is None:
            first_sequence = max(1, int(time.time() * 1_000_000))
        self.first_sequence = first_sequence
        self.last_sequence = first_sequence - 1

    def publish(self, event: Event) -> Envelope:
        """Number `event`, keep it in the ring and offer it to every subscriber. Never blocks."""
        self.last_sequence += 1
        envelope = Envelope(self.last_sequence, self._clock(), event)
        size = weight(event)
        self._ring.append((envelope, size))
        self._ring_bytes += size
        while len(self._ring) > self._history or (self._ring_bytes > self._history_bytes and self._ring):
            self._ring_bytes -= self._ring.popleft()[1]
        for subscriber in self._subscribers:
            subscriber._offer(envelope, size)
        if self._idle:
            # Woken in turns, not all at once.
            self._turns.extend(self._idle)
            self._idle.clear()
            self._pump_soon()
        return envelope

    def _pump_soon(self) -> None:
        if not self._pumping:
            self._pumping = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        """Let the next `turns_per_step` waiting subscribers through; again at the next pass if more wait.

        `call_soon` runs it after the loop has polled for I/O once more: what
        else is ready (a Load's next step) runs between two batches.
        """
        granted = 0
        turns = self._turns
        while turns and granted < self._turns_per_step:
            future = turns.popleft()
            if not future.done():
                future.set_result(None)
                granted += 1
        if turns:
            asyncio.get_running_loop().call_soon(self._pump)
        else:
            self._pumping = False

    def subscribe(self) -> Subscription:
        """A new subscription receiving every event published from now on (closed at once after `close`).

        Raises `Overloaded` when `max_subscribers` are subscribed already.
        """
        if len(self._subscribers) >= self._max_subscribers:
            raise Overloaded(
                f"too many Watch streams: {len(self._subscribers)} open"
                f" (limit {self._max_subscribers}); retry later"
            )
        subscription = Subscription(self, self._subscriber_queue, self._subscriber_bytes)
        if self._closed is not None:
            subscription._close(self._closed)
        else:
            self._subscribers.add(subscription)
        return subscription

    def close(self, error: BaseException) -> None:
        """End every subscription, now and to come, with `error` (they see it in `closed`). Idempotent."""
        if self._closed is not None:
            return
        self._closed = error
        for subscriber in self._subscribers:
            subscriber._close(error)
        self._subscribers.clear()
        # Every waiter at once: they end, nothing is sent.
        for future in [*self._idle, *self._turns]:
            if not future.done():
                future.set_result(None)
        self._idle.clear()
        self._turns.clear()

    def since(self, sequence: int) -> list[Envelope] | None:
        """Buffered events after `sequence`, or None when some of them are gone from the ring.

        0 means "before this run's first event". A number outside this run's
        range (another run's) answers None.
        """
        if sequence == 0:
            sequence = self.first_sequence - 1
        if not self.first_sequence - 1 <= sequence <= self.last_sequence:
            return None
        if sequence == self.last_sequence:
            return []
        if not self._ring or self._ring[0][0].sequence > sequence + 1:
            return None
        return [e for e, _ in self._ring if e.sequence > sequence]
