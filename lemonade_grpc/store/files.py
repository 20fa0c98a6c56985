"""Crash-safe file replacement, shared by every file the server keeps in its state directory.

`write_atomically` is the blocking primitive. `AtomicWriter` runs it off the
event loop (issue 9, finding 20: fsync ran on the loop, stalling every stream
for as long as the disk took), one write at a time per file, coalescing
writes that queue up behind a slow one.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`: a crash leaves the old or the new file, never half of one.

    Writes a temporary file beside it, fsyncs it, renames it over `path`
    (atomic on POSIX), then fsyncs the directory so the rename itself is
    durable. Blocking: on the event loop's thread use `AtomicWriter`.
    Raises OSError when any step fails (the old file is then left as it was).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class AtomicWriter:
    """Writes one file atomically, off the event loop, one write at a time, the latest text winning.

    `await writer.write(text)` returns once a write of `text`, or of a text
    given later, is durable; it raises the exception of that write when it
    failed (OSError: the disk or the directory refused it). Texts given while
    a write is in progress are coalesced: only the newest is written next, and
    every caller waiting on it gets its outcome. So callers pass the whole
    current content each time (a snapshot), never a delta.

    A caller's cancellation does not cancel the write (a state file must not
    be left behind the state it records): the write goes on in a worker
    thread. A failed write is not retried by itself; the next `write` tries
    again with the newest text.

    Loop thread only; one writer per file (two writers of the same path
    would race on its temporary file).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._text: str | None = None  # the newest text not yet being written
        self._queued: list[asyncio.Future[Exception | None]] = []  # callers waiting for `_text`
        self._writing: list[asyncio.Future[Exception | None]] = []  # callers of the write in progress
        self._worker: asyncio.Task[None] | None = None

    async def write(self, text: str) -> None:
        """Make `text` (or a newer text) the file's durable content; raise if that write failed.

        Safe to call concurrently and any number of times. Does not retry.
        """
        outcome: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self._text = text
        self._queued.append(outcome)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name=f"write {self.path.name}")
        # Waiting on a future of our own: cancelling this caller cancels it, never the write.
        error = await outcome
        if error is not None:
            raise error

    @property
    def busy(self) -> bool:
        """Whether a write is in progress or queued."""
        return self._worker is not None and not self._worker.done()

    async def _drain(self) -> None:
        """Write the newest text until no caller waits; hand each write's outcome to its callers."""
        try:
            while self._queued:
                text, self._writing = self._text, self._queued
                self._text, self._queued = None, []
                assert text is not None
                error: Exception | None = None
                try:
                    await asyncio.to_thread(write_atomically, self.path, text)
                except Exception as failure:  # handed to the callers, who raise it
                    error = failure
                for outcome in self._writing:
                    if not outcome.done():  # done: that caller was cancelled
                        outcome.set_result(error)
                self._writing = []
        finally:
            # Cancelled (the loop is closing): whoever still waits learns it.
            for outcome in (*self._writing, *self._queued):
                outcome.cancel()
