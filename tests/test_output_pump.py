"""A backend's output pump: lines to listeners at once; with none (a ready backend), read in batches.

Issue 13: llama-server writes a dozen lines around each request, several
while its first token is being made; reading each as it came woke the event
loop on that token's path.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import eventually
from lemonade_grpc.backends import output
from lemonade_grpc.backends.output import OutputPump


async def pump_of(tmp_path: Path) -> tuple[OutputPump, int, Path]:
    read_fd, write_fd = os.pipe()
    log = tmp_path / "backend.log"
    return OutputPump(read_fd, log.open("ab")), write_fd, log


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
    reads = 0
    real_read = os.read

    def counted(fd: int, size: int) -> bytes:
        nonlocal reads
        reads += 1
        return real_read(fd, size)

    monkeypatch.setattr(os, "read", counted)  # the module calls os.read at each read
    pump, write_fd, log = await pump_of(tmp_path)
    try:
        written = await write_lines(write_fd, 20)
        await eventually(lambda: log.read_bytes() == written, 10, "every line in the log")
        assert reads <= 5, f"{reads} reads for 20 lines: each line woke the loop"
    finally:
        os.close(write_fd)
        await pump.close(5)
    assert pump.done.is_set()


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
