"""A backend's output, followed as it comes: appended to its log file, each line handed to listeners.

The backend writes to a pipe, not to its log file directly, so that the
control plane sees its lines the moment they are written: llama-server's
"listening on" (readiness without a polling delay) and its load phases
(issue 12). Lines longer than `MAX_LINE_BYTES` reach listeners cut; the log
file gets every byte. With no listener (a backend that is ready), chunks
go to the file without being split into lines, and are read
`DEFER_SECONDS` after they arrive, all at once: llama-server writes a
dozen lines around each request, several as its first token is being
made, and reading each as it came woke the event loop on the path of that
token (issue 13). The pipe holds 64 KiB meanwhile, far more than a
backend logs in that time.

The pipe is ours (`os.pipe`), read with the event loop's reader callback,
not asyncio's subprocess pipe: with that one, `Process.wait()` returned
only once every holder of the pipe had closed it, so a backend's child that
kept it open hid the backend's own exit (a dead backend stayed READY).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import BinaryIO

log = logging.getLogger(__name__)

READ_BYTES = 65536
MAX_LINE_BYTES = 4096
DEFER_SECONDS = 0.05

Listener = Callable[[str], None]


class OutputPump:
    """Copies what arrives on `read_fd` to `log_file`, and each complete line to the listeners."""

    def __init__(self, read_fd: int, log_file: BinaryIO) -> None:
        self._fd = read_fd
        self._log = log_file
        self._listeners: list[Listener] = []
        self._partial = b""
        self._deferred: asyncio.TimerHandle | None = None
        self._draining = False
        self._write_failed = False
        self.done = asyncio.Event()
        os.set_blocking(read_fd, False)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(read_fd, self._readable)

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with each line from now on; returns what stops it."""
        self._listeners.append(listener)
        self._catch_up_now()  # what waits to be read is read now: a listener waits for it

        def stop() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return stop

    def _readable(self) -> None:
        if not self._listeners and not self._draining and self._deferred is None:
            # Nobody waits for these lines: take them a little later, together.
            self._loop.remove_reader(self._fd)
            self._deferred = self._loop.call_later(DEFER_SECONDS, self._catch_up)
            return
        self._read()

    def _catch_up(self) -> None:
        self._deferred = None
        self._loop.add_reader(self._fd, self._readable)
        self._read()

    def _catch_up_now(self) -> None:
        if self._deferred is not None and not self.done.is_set():
            self._deferred.cancel()
            self._catch_up()

    def _read(self) -> None:
        try:
            chunk = os.read(self._fd, READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # every writer has closed it
            if self._partial and self._listeners:
                self._tell(self._partial.decode("utf-8", "replace"))
            self._finish()
            return
        self._write(chunk)
        if not self._listeners:
            self._partial = b""
            return
        *lines, partial = (self._partial + chunk).split(b"\n")
        self._partial = partial[:MAX_LINE_BYTES]
        for line in lines:
            self._tell(line[:MAX_LINE_BYTES].decode("utf-8", "replace").rstrip("\r"))

    def _write(self, chunk: bytes) -> None:
        try:
            self._log.write(chunk)
            self._log.flush()  # error messages read this run's lines from the file
        except OSError as error:  # a full disk must not stop the pipe (the backend would block)
            if not self._write_failed:
                log.warning("cannot write backend output to %s: %s (said once)", self._log.name, error)
            self._write_failed = True

    def _tell(self, line: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(line)
            except Exception:
                log.exception("a backend output listener failed")

    def _finish(self) -> None:
        if self.done.is_set():
            return
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._log.close()
        self.done.set()

    async def close(self, seconds: float) -> None:
        """Wait up to `seconds` for the rest of the output (the group is gone), then stop reading."""
        self._draining = True  # read as it comes: the stop waits for the end of it
        self._catch_up_now()
        try:
            await asyncio.wait_for(self.done.wait(), seconds)
        except TimeoutError:
            pass  # a process outside the group holds the pipe: no longer ours to read
        finally:
            self._finish()
