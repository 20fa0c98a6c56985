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
        # Within the margin of what the trim left (60 MiB): no more trims, however long.
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


async def test_finding_15_each_small_growth_is_trimmed_once_and_a_steady_rss_never() -> None:
    """The heap's slow creep under churn (+1 MiB and more) is given back; what stays is trimmed once."""
    rss = [50 * MIB]
    trimmed: list[int] = []

    def trim() -> None:
        trimmed.append(rss[0])
        rss[0] -= MIB // 2  # a trim gives back half a MiB of the creep; the rest is CPython's arenas

    trimmer = HeapTrimmer(interval=0.001, growth=MIB, rss=lambda: rss[0], trim=trim)
    task = asyncio.create_task(trimmer.run())
    try:
        await eventually(lambda: trimmer.checks >= 1, 10, "the trimmer to take its floor")
        rss[0] = 50 * MIB + MIB // 2  # growth within the margin: left alone
        checks = trimmer.checks
        await eventually(lambda: trimmer.checks >= checks + 20, 10, "twenty more checks")
        assert trimmed == []
        rss[0] = 52 * MIB  # the creep passes the margin
        await eventually(lambda: trimmer.trims == 1, 10, "the creep to be trimmed")
        # 51.5 MiB stays: above the start's 50 + 1, but it is what the trim left, so never again.
        checks = trimmer.checks
        await eventually(lambda: trimmer.checks >= checks + 20, 10, "twenty more checks")
        assert trimmed == [52 * MIB]
        rss[0] = 53 * MIB  # more than a MiB above what the trim left: once more
        await eventually(lambda: trimmer.trims == 2, 10, "the next creep to be trimmed")
        assert trimmed == [52 * MIB, 53 * MIB]
    finally:
        task.cancel()
