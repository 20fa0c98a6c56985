"""EventBus: gap-free sequence numbers, resume from the ring, overflow never blocks."""

from __future__ import annotations

from lemonade_grpc.pool.events import EventBus, PinChanged


def test_sequences_start_at_one_without_gaps() -> None:
    bus = EventBus()
    sequences = [bus.publish(PinChanged("m", True)).sequence for _ in range(5)]
    assert sequences == [1, 2, 3, 4, 5]
    assert bus.last_sequence == 5


def test_since_resumes_from_the_ring_or_says_it_cannot() -> None:
    bus = EventBus(history=3)
    for _ in range(5):
        bus.publish(PinChanged("m", True))
    assert [e.sequence for e in bus.since(3) or []] == [4, 5]
    assert bus.since(5) == []
    assert bus.since(1) is None  # 2 fell out of the ring
    assert bus.since(2) is not None
    assert bus.since(99) is None  # a number from another run of the server


async def test_full_subscriber_overflows_instead_of_blocking() -> None:
    bus = EventBus(subscriber_queue=2)
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
