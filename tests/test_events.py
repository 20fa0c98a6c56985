"""EventBus: gap-free sequence numbers unique across runs, resume from the ring, bounds in bytes, close."""

from __future__ import annotations

import asyncio

import pytest

from lemonade_grpc.core.errors import Overloaded
from lemonade_grpc.pool.events import EventBus, PinChanged, PoolWarning, weight


def test_sequences_are_gap_free_from_the_first() -> None:
    bus = EventBus(first_sequence=1)
    assert bus.last_sequence == 0
    sequences = [bus.publish(PinChanged("m", True)).sequence for _ in range(5)]
    assert sequences == [1, 2, 3, 4, 5]
    assert bus.last_sequence == 5


def test_each_run_numbers_its_events_above_every_earlier_run() -> None:
    earlier = EventBus()
    for _ in range(1000):
        earlier.publish(PinChanged("m", True))
    later = EventBus()
    assert later.first_sequence > earlier.last_sequence
    # A subscriber of the earlier run resumes against the later one: never replayed wrong events.
    assert later.since(earlier.last_sequence) is None
    assert earlier.since(later.first_sequence + 5) is None


def test_since_resumes_from_the_ring_or_says_it_cannot() -> None:
    bus = EventBus(history=3, first_sequence=1)
    assert bus.since(0) == []  # nothing published yet: nothing missed
    for _ in range(5):
        bus.publish(PinChanged("m", True))
    assert [e.sequence for e in bus.since(3) or []] == [4, 5]
    assert bus.since(5) == []
    assert bus.since(1) is None  # 2 fell out of the ring
    assert bus.since(0) is None  # so did the run's first events
    assert bus.since(2) is not None
    assert bus.since(99) is None  # a number never issued


def test_since_zero_replays_the_whole_run_while_the_ring_holds_it() -> None:
    bus = EventBus(first_sequence=500)
    for _ in range(3):
        bus.publish(PinChanged("m", True))
    assert [e.sequence for e in bus.since(0) or []] == [500, 501, 502]
    assert bus.since(7) is None  # below this run's range


def test_the_ring_is_bounded_in_bytes() -> None:
    big = PoolWarning("X", "x" * 10_000)
    bus = EventBus(history=1000, history_bytes=3 * weight(big), first_sequence=1)
    for _ in range(10):
        bus.publish(big)
    assert [e.sequence for e in bus.since(7) or []] == [8, 9, 10]
    assert bus.since(6) is None  # 7 was dropped for its bytes, not its count


async def test_full_subscriber_overflows_instead_of_blocking() -> None:
    bus = EventBus(subscriber_queue=2, first_sequence=1)
    slow = bus.subscribe()
    fast = bus.subscribe()
    for _ in range(2):
        bus.publish(PinChanged("m", True))
    assert [e.sequence for e in fast.drain()] == [1, 2]
    bus.publish(PinChanged("m", False))  # slow's queue is full: it overflows
    assert slow.overflowed
    assert not fast.overflowed
    assert list(slow.drain()) == []
    slow.reset()
    bus.publish(PinChanged("m", True))
    assert [e.sequence for e in slow.drain()] == [4]
    slow.close()
    slow.close()  # idempotent


async def test_a_subscriber_queue_overflows_on_bytes_too() -> None:
    big = PoolWarning("X", "x" * 10_000)
    bus = EventBus(subscriber_queue=1000, subscriber_bytes=2 * weight(big), first_sequence=1)
    subscriber = bus.subscribe()
    bus.publish(big)
    bus.publish(big)
    assert not subscriber.overflowed
    bus.publish(big)
    assert subscriber.overflowed
    assert list(subscriber.drain()) == []


async def test_close_wakes_every_subscriber_and_ends_later_ones_at_once() -> None:
    bus = EventBus()
    subscriber = bus.subscribe()
    waiting = asyncio.ensure_future(subscriber.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    error = RuntimeError("shutting down")
    bus.close(error)
    await asyncio.wait_for(waiting, 5)
    assert subscriber.closed is error
    bus.publish(PinChanged("m", True))  # nobody listens any more
    assert list(subscriber.drain()) == []
    late = bus.subscribe()
    assert late.closed is error
    await asyncio.wait_for(late.wait(), 5)


def test_subscribers_beyond_the_limit_are_refused_overloaded() -> None:
    bus = EventBus(max_subscribers=2)
    first, second = bus.subscribe(), bus.subscribe()
    with pytest.raises(Overloaded) as refused:
        bus.subscribe()
    assert "2 open (limit 2)" in refused.value.message
    first.close()
    third = bus.subscribe()  # a slot freed is a slot taken
    assert third.closed is None
    second.close()
    third.close()


async def test_subscribers_take_turns_a_few_per_pass_of_the_loop_and_every_one_gets_one() -> None:
    # Issue 13: a thousand Watch streams woken at once put a thousand steps
    # ahead of a concurrent Load in the loop's ready queue.
    bus = EventBus(turns_per_step=2, first_sequence=1)
    subscribers = [bus.subscribe() for _ in range(5)]
    waits = [subscriber.wait() for subscriber in subscribers]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waits), "nothing published: nobody is woken"
    bus.publish(PinChanged("m", True))
    woken = []
    for _ in range(3):
        await asyncio.sleep(0)  # one pass of the loop
        woken.append(sum(w.done() for w in waits))
    assert woken == [2, 4, 5]
    assert [[e.sequence for e in s.drain()] for s in subscribers] == [[1]] * 5


async def test_a_subscriber_with_events_queued_still_waits_for_its_turn() -> None:
    bus = EventBus(turns_per_step=1, first_sequence=1)
    first, second = bus.subscribe(), bus.subscribe()
    bus.publish(PinChanged("m", True))
    bus.publish(PinChanged("m", False))
    turns = [first.wait(), second.wait()]
    assert not any(t.done() for t in turns), "a turn is given by the pump, never at once"
    await asyncio.sleep(0)
    assert [t.done() for t in turns] == [True, False]
    assert first.take() is not None  # one event per turn: the next one waits for another
    again = first.wait()
    await asyncio.sleep(0)
    assert [turns[1].done(), again.done()] == [True, False], "first come, first served"
    await asyncio.sleep(0)
    assert again.done()
    assert [e.sequence for e in first.drain()] == [2]
    assert [e.sequence for e in second.drain()] == [1, 2]


async def test_subscribers_that_leave_while_idle_leave_nothing_behind() -> None:
    # A dashboard reconnecting every minute for days with no event in between
    # must not grow the bus with every visit.
    bus = EventBus(first_sequence=1)
    for _ in range(100):
        subscriber = bus.subscribe()
        waiting = asyncio.ensure_future(subscriber.wait())
        await asyncio.sleep(0)
        waiting.cancel()
        subscriber.close()
    assert not bus._idle
    assert not bus._turns
    assert not bus._subscribers
    # A cancelled turn is skipped: the others still get theirs.
    bus = EventBus(turns_per_step=1, first_sequence=1)
    gone, staying = bus.subscribe(), bus.subscribe()
    bus.publish(PinChanged("m", True))
    cancelled, kept = gone.wait(), staying.wait()
    cancelled.cancel()
    await asyncio.sleep(0)
    assert kept.done()
    assert not kept.cancelled()
