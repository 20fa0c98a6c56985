"""A backend's output pump: lines to listeners at once; with none (a ready backend), read in batches.

Issue 13: llama-server writes a dozen lines around each request, several
while its first token is being made; reading each as it came woke the event
loop on that token's path. Issue 18 finding 7: but a burst is read as it
comes, each wake-up until the pipe is empty (one 64 KiB read per 50 ms held
a backend writing 64 KiB of stderr per token to 19.5 tokens/s).

The deferral is set to minutes here: whatever a test sees in the log within
its deadline was read without waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import eventually
from lemonade_grpc.backends import output
from lemonade_grpc.backends.logfile import BackendLog
from lemonade_grpc.backends.output import OutputPump, waiting_bytes
from lemonade_grpc.core.settings import BackendLogSettings

# No free-space reserve: what these tests see must not depend on the machine's disk.
UNBOUNDED = BackendLogSettings(min_free_mb=0)


async def pump_of(tmp_path: Path) -> tuple[OutputPump, int, Path]:
    read_fd, write_fd = os.pipe()
    log = tmp_path / "backend.log"
    return OutputPump(read_fd, BackendLog(log, UNBOUNDED)), write_fd, log


async def write_lines(write_fd: int, count: int) -> bytes:
    """`count` lines, each its own write with a loop turn between (as a backend's log calls come)."""
    written = b""
    for index in range(count):
        line = f"line {index}\n".encode()
        os.write(write_fd, line)
        written += line
        await asyncio.sleep(0.001)
    return written


async def test_with_no_listener_lines_are_read_together_and_all_reach_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(output, "DEFER_SECONDS", 300.0)
    pump, write_fd, log = await pump_of(tmp_path)
    try:
        written = await write_lines(write_fd, 20)
        # The first line deferred the read; the others did not wake the loop to read.
        assert pump.deferrals == 1
        assert pump.reads == 0, f"{pump.reads} reads while 20 lines came: lines woke the loop"
        assert waiting_bytes(pump._fd) == len(written)
    finally:
        os.close(write_fd)
        await pump.close(5)  # a stop reads what waits at once
    assert pump.done.is_set()
    assert log.read_bytes() == written
    assert pump.reads == 2, "one read for the 20 lines, one for the end"


def has_lines(seen: list[str], count: int) -> Callable[[], bool]:
    return lambda: len(seen) == count


async def test_a_listener_gets_each_line_as_it_comes(tmp_path: Path) -> None:
    pump, write_fd, _ = await pump_of(tmp_path)
    seen: list[str] = []
    pump.listen(seen.append)
    try:
        for index in range(5):
            os.write(write_fd, f"line {index}\n".encode())
            # Each line before the next is written: nothing waits for a batch.
            await eventually(has_lines(seen, index + 1), 10, f"line {index} to the listener")
    finally:
        os.close(write_fd)
        await pump.close(5)
    assert seen == [f"line {index}" for index in range(5)]


async def test_a_listener_added_while_lines_wait_gets_them_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A backend's first lines can come before its listener is added; they must not wait.
    monkeypatch.setattr(output, "DEFER_SECONDS", 30.0)
    pump, write_fd, _ = await pump_of(tmp_path)
    try:
        os.write(write_fd, b"listening on 127.0.0.1:1\n")
        await eventually(lambda: pump._deferred is not None, 10, "the read to be deferred")
        seen: list[str] = []
        pump.listen(seen.append)
        await eventually(has_lines(seen, 1), 5, "the waiting line to reach the new listener")
    finally:
        os.close(write_fd)
        await pump.close(5)


async def test_closing_reads_what_waits_and_the_end_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stop waits for the end of the output: it must not wait for a deferred read.
    monkeypatch.setattr(output, "DEFER_SECONDS", 30.0)
    pump, write_fd, log = await pump_of(tmp_path)
    os.write(write_fd, b"last words\n")
    await eventually(lambda: pump._deferred is not None, 10, "the read to be deferred")
    os.close(write_fd)  # the backend is gone
    await pump.close(5)
    assert pump.done.is_set()
    assert log.read_bytes() == b"last words\n"


async def write_all(write_fd: int, data: bytes, seconds: float) -> None:
    """Write `data` to the pipe as fast as it takes it, never blocking the loop; fail after `seconds`."""
    os.set_blocking(write_fd, False)
    view = memoryview(data)

    def more() -> bool:  # 64 KiB per write, until the pipe is full
        nonlocal view
        with contextlib.suppress(BlockingIOError):
            while view:
                view = view[os.write(write_fd, view[:65536]) :]
        return not view

    await eventually(more, seconds, "the pipe to take everything written")


async def test_finding_7_a_burst_with_no_listener_is_read_as_it_comes_not_a_chunk_per_deferral(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 4 MiB, 64 KiB per write, as a backend writing 64 KiB of stderr per token. With a read of 64 KiB
    # per deferral (issue 18 finding 7), this took one deferral per 64 KiB: here, 64 times 300 s.
    monkeypatch.setattr(output, "DEFER_SECONDS", 300.0)
    pump, write_fd, log = await pump_of(tmp_path)
    data = bytes(range(256)) * (4 * 4096)
    try:
        await write_all(write_fd, data, 30)
        await eventually(lambda: log.stat().st_size == len(data), 30, "all of it in the log")
        assert pump.deferrals == 0
    finally:
        os.close(write_fd)
        await pump.close(5)
    assert log.read_bytes() == data


async def test_finding_7_a_deferred_read_takes_everything_that_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A trickle first (deferred), then far more than one read's worth arrives meanwhile: when the
    # deferred read comes, it empties the pipe, not one 64 KiB chunk of it (issue 18 finding 7).
    monkeypatch.setattr(output, "DEFER_SECONDS", 300.0)
    pump, write_fd, log = await pump_of(tmp_path)
    try:
        os.write(write_fd, b"a line\n")
        await eventually(lambda: pump._deferred is not None, 10, "the read to be deferred")
        os.set_blocking(write_fd, False)
        written = b"a line\n"
        for index in range(6):  # 384 KiB: more than one read, less than the pipe (1 MiB)
            chunk = bytes([index]) * 65536
            assert os.write(write_fd, chunk) == len(chunk)
            written += chunk
        assert waiting_bytes(pump._fd) == len(written)
        pump._catch_up_now()  # what the timer would do, now
        assert waiting_bytes(pump._fd) == 0, "the deferred read left output in the pipe"
        assert log.read_bytes() == written
    finally:
        os.close(write_fd)
        await pump.close(5)
