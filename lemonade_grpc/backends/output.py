"""A backend's output, followed as it comes: appended to its log file, each line handed to listeners.

The backend writes to a pipe, not to its log file directly, so that the
control plane sees its lines the moment they are written: llama-server's
"listening on" (readiness without a polling delay) and its load phases
(issue 12). Lines longer than `MAX_LINE_BYTES` reach listeners cut; the log
(`BackendLog`: capped, issue 18 finding 6) gets every byte it has room for.

With no listener (a backend that is ready), a trickle is read
`DEFER_SECONDS` after it arrives, all at once, without being split into
lines: llama-server writes a dozen lines around each request, several as
its first token is being made, and reading each as it came woke the event
loop on the path of that token (issue 13). A burst is read as it comes:
when `BURST_BYTES` or more wait at the first wake-up, or a read took that
much, output is read at once for the next `DEFER_SECONDS` (issue 18
finding 7: reading one 64 KiB chunk per deferral held a backend writing
64 KiB of stderr per token to 19.5 tokens/s, blocked in write()). Each
wake-up reads until the pipe is empty (a read that does not fill the
buffer), at most `MAX_READS` reads before the loop's other work. The pipe
is widened to `PIPE_BYTES` so that a deferral's worth of a busy backend's
lines fits in it (1 MiB: 20 MB/s for 50 ms).

The pipe is ours (`os.pipe`), read with the event loop's reader callback,
not asyncio's subprocess pipe: with that one, `Process.wait()` returned
only once every holder of the pipe had closed it, so a backend's child that
kept it open hid the backend's own exit (a dead backend stayed READY).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import termios
from collections.abc import Callable

from lemonade_grpc.backends.logfile import BackendLog

log = logging.getLogger(__name__)

READ_BYTES = 65536
MAX_LINE_BYTES = 4096
DEFER_SECONDS = 0.05
# What waits in the pipe at a wake-up for it to be a burst, read at once,
# not a trickle of lines: llama-server's lines around a request are 1-2 KiB.
BURST_BYTES = 16384
# Reads per wake-up at most (the reader callback comes again at the loop's next turn).
MAX_READS = 16
PIPE_BYTES = 1 << 20  # Linux's default pipe-max-size: what an unprivileged process may ask for

Listener = Callable[[str], None]


class OutputPump:
    """Copies what arrives on `read_fd` to `log`, and each complete line to the listeners.

    Owns both: closes them when the output ends (`done`) or at `close`.
    """

    def __init__(self, read_fd: int, log: BackendLog) -> None:
        self._fd = read_fd
        self.log = log
        self._listeners: list[Listener] = []
        self._partial = b""
        self._deferred: asyncio.TimerHandle | None = None
        self._draining = False
        # Until when (loop time) output is read as it comes: a burst was seen.
        self._burst_until = 0.0
        # Deferred reads so far, and reads: what tests count.
        self.deferrals = 0
        self.reads = 0
        self.done = asyncio.Event()
        os.set_blocking(read_fd, False)
        with contextlib.suppress(OSError):  # a narrower pipe only defers less well
            fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
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
        if (
            not self._listeners
            and not self._draining
            and self._deferred is None
            and self._loop.time() >= self._burst_until
            and waiting_bytes(self._fd) < BURST_BYTES
        ):
            # Nobody waits for these lines and they are few: take them a little later, together.
            self._loop.remove_reader(self._fd)
            self._deferred = self._loop.call_later(DEFER_SECONDS, self._catch_up)
            self.deferrals += 1
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
        """Read until the pipe is empty (at most `MAX_READS` reads); a burst keeps reads immediate."""
        taken = 0
        for _ in range(MAX_READS):
            try:
                chunk = os.read(self._fd, READ_BYTES)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            self.reads += 1
            if not chunk:  # every writer has closed it
                if self._partial and self._listeners:
                    self._tell(self._partial.decode("utf-8", "replace"))
                self._finish()
                return
            taken += len(chunk)
            self._take(chunk)
            if len(chunk) < READ_BYTES:
                break  # the pipe is empty: one more read would only say so
        if taken >= BURST_BYTES:
            self._burst_until = self._loop.time() + DEFER_SECONDS

    def _take(self, chunk: bytes) -> None:
        self.log.write(chunk)  # never raises: a full disk must not stop the pipe (the backend would block)
        if not self._listeners:
            self._partial = b""
            return
        *lines, partial = (self._partial + chunk).split(b"\n")
        self._partial = partial[:MAX_LINE_BYTES]
        for line in lines:
            self._tell(line[:MAX_LINE_BYTES].decode("utf-8", "replace").rstrip("\r"))

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
        self.log.close()
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


def waiting_bytes(fd: int) -> int:
    """How many bytes wait to be read in the pipe `fd` (FIONREAD); 0 when it cannot be asked."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    except OSError:
        return 0
