"""A backend's output, followed as it comes: appended to its log file, each line handed to listeners.

The backend writes to a pipe, not to its log file directly, so that the
control plane sees its lines the moment they are written: llama-server's
"listening on" (readiness without a polling delay) and its load phases
(issue 12). Lines longer than `MAX_LINE_BYTES` reach listeners cut; the log
file gets every byte.

The pump is a task of its own (a fresh context: it is the process's, not
the request's that started it). It ends when every writer has closed the
pipe (the process group is gone) or when it is cancelled (`close`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from typing import BinaryIO

log = logging.getLogger(__name__)

READ_BYTES = 65536
MAX_LINE_BYTES = 4096

Listener = Callable[[str], None]


class OutputPump:
    """Copies `stream` to `log` and calls each listener with every complete line (without its newline)."""

    def __init__(self, stream: asyncio.StreamReader, log_file: BinaryIO) -> None:
        self._stream = stream
        self._log = log_file
        self._listeners: list[Listener] = []
        self.task = asyncio.get_running_loop().create_task(
            self._run(), name="backend output", context=contextvars.Context()
        )

    def listen(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` with each line from now on; returns what stops it."""
        self._listeners.append(listener)

        def stop() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return stop

    async def _run(self) -> None:
        partial = b""
        try:
            while chunk := await self._stream.read(READ_BYTES):
                self._write(chunk)
                *lines, partial = (partial + chunk).split(b"\n")
                partial = partial[:MAX_LINE_BYTES]
                for line in lines:
                    self._tell(line[:MAX_LINE_BYTES].decode("utf-8", "replace").rstrip("\r"))
            if partial:
                self._tell(partial.decode("utf-8", "replace"))
        finally:
            self._log.close()

    def _write(self, chunk: bytes) -> None:
        try:
            self._log.write(chunk)
            self._log.flush()  # error messages read this run's lines from the file
        except OSError as error:  # a full disk must not stop the pipe (the backend would block)
            log.warning("cannot write backend output to %s: %s", self._log.name, error)

    def _tell(self, line: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(line)
            except Exception:
                log.exception("a backend output listener failed")

    async def close(self, seconds: float) -> None:
        """Wait up to `seconds` for the rest of the output, then stop reading."""
        try:
            await asyncio.wait_for(asyncio.shield(self.task), seconds)
        except TimeoutError:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
