"""Freed heap memory goes back to the system (issue 18 finding 3): the trimmer's rule, driven by the test."""

from __future__ import annotations

import asyncio

from conftest import eventually
from lemonade_grpc.heap import HeapTrimmer, malloc_trim, own_rss, should_trim

MIB = 1 << 20


def test_trim_only_when_the_rss_grew_past_the_floor() -> None:
    assert not should_trim(100 * MIB, 80 * MIB, 32 * MIB)
    assert should_trim(113 * MIB, 80 * MIB, 32 * MIB)


async def test_finding_3_the_trimmer_gives_back_what_a_burst_left_and_then_rests() -> None:
    rss = [50 * MIB]  # what the fake /proc says; the test moves it
    trimmed: list[int] = []

    def trim() -> None:
        trimmed.append(rss[0])
        rss[0] = 60 * MIB  # what a trim leaves

    trimmer = HeapTrimmer(interval=0.001, growth=32 * MIB, rss=lambda: rss[0], trim=trim)
    task = asyncio.create_task(trimmer.run())
    try:
        await eventually(lambda: trimmer.checks >= 1, 10, "the trimmer to take its floor")
        rss[0] = 1000 * MIB  # a burst came and went
        await eventually(lambda: trimmer.trims == 1, 10, "the burst to be trimmed")
        assert trimmed == [1000 * MIB]
        # Below the floor's margin (the floor is the start's 50 MiB): no more trims, however long.
        rss[0] = 70 * MIB
        checks = trimmer.checks
        await eventually(lambda: trimmer.checks >= checks + 20, 10, "twenty more checks")
        assert trimmer.trims == 1
    finally:
        task.cancel()


def test_the_real_trim_and_rss_exist_here() -> None:
    # glibc on the machines this runs on: the trimmer is not silently off.
    trim = malloc_trim()
    assert trim is not None
    trim()
    assert own_rss() > MIB
