"""One owner per state directory (DESIGN.md lesson 11), and the process's file-descriptor limit.

A server reaps the backends recorded in its state directory at boot. Two
servers on one directory (the shared default, `serve` started twice by
mistake) would therefore kill each other's backends (issue 9, finding 5).
So the first thing `serve` does is take an exclusive, non-blocking `flock`
on `STATE_DIR/lock` and hold it for its whole life; a second server finds it
held, says who holds it, and exits without touching anything.

`flock` locks belong to the open file description: the kernel drops the lock
when the last descriptor closes, so a crashed server never leaves a stale
lock behind. The descriptor is close-on-exec, so a backend that outlives us
can never hold the lock on our behalf.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import resource
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = "lock"

# The exit status of a `serve` that found its state directory in use: the
# CLI's status for a configuration problem (the operator must pick another
# directory or stop the other server).
EXIT_STATE_DIR_LOCKED = 2


class StateDirLocked(Exception):
    """Another live process holds the state directory's lock. `holder_pid` is None when unknown."""

    def __init__(self, state_dir: Path, holder_pid: int | None) -> None:
        holder = (
            f"pid {holder_pid}" if holder_pid is not None else "a process that has not written its pid yet"
        )
        super().__init__(
            f"state directory {state_dir} is in use by another lemonade-grpc server ({holder}); "
            "not starting (stop it, or give this one another --state-dir)"
        )
        self.state_dir = state_dir
        self.holder_pid = holder_pid


class StateDirLock:
    """The exclusive lock of one state directory, held from `acquire` until `release` or exit."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, state_dir: Path) -> StateDirLock:
        """Create `state_dir` if needed, lock `state_dir/lock` and write our pid into it.

        Raises `StateDirLocked` when another process holds the lock, having
        changed nothing (the lock file is opened without truncation and only
        read), and OSError when the directory or the file cannot be created
        or opened. Does not block. Not reentrant within a process: a second
        `acquire` of the same directory by the same process opens a new
        descriptor and finds the lock held.
        """
        # Owner only when we create it: pins, the backend registry and the
        # backends' logs (prompts may show in them) are no one else's business.
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = state_dir / LOCK_NAME
        # O_CLOEXEC: a backend must never inherit it (it could hold the lock after we die).
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_pid(fd)
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StateDirLocked(state_dir, holder) from None
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as error:
            # The lock is what matters; the pid is only for the second server's message.
            log.warning("cannot write our pid into %s: %s", path, error)
        return cls(path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (closing its descriptor). Idempotent. The lock file stays; its content is stale."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode("ascii").strip())
    return None


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force.

    A server holds a few descriptors per stream (the client's HTTP/2 stream
    shares one, the backend connection is one more), and 1,024 (a common
    default soft limit) ended streams with "Too many open files" (issue 9,
    finding 7). The hard limit is the most an unprivileged process may take.
    Backends inherit the raised limit. On failure, logs and returns the
    current soft limit. Safe to call twice.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        # Linux refuses "unlimited" for descriptors; this is its default ceiling (fs.nr_open).
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            soft = hard
        except (ValueError, OSError) as error:
            log.warning("cannot raise the file descriptor limit from %d to %d: %s", soft, hard, error)
    return soft
