"""A backend's log file: appended across runs, capped, and never allowed to starve the state files.

Issue 18 finding 6: a backend logging 1.2 MiB/s filled a 16 MiB state
filesystem; then pins.json could not be written (Pin answered
STATE_WRITE_FAILED) and neither could backends.json (every Load failed).
Three bounds, from `BackendLogSettings` (the config's `[backend_logs]`):

- Per file: when `logs/MODEL.log` would pass `max_file_bytes` it becomes
  `MODEL.log.1`, replacing the one before, and a new file starts, so a
  model's logs take at most twice the cap however long it runs.
- The directory: each time a log is opened (a backend starts), the logs of
  models not running are deleted, oldest first, until all take at most
  `max_total_bytes` (a catalog of many models, each of which ran once).
- Free space: output that would leave less than `min_free_bytes` free on
  the filesystem is dropped, not written, and counted; when writing
  resumes (or the backend stops) a line in the log says how many bytes
  were dropped and why. The pipe is still read meanwhile: a backend never
  blocks on a full disk.

Writes go straight to the descriptor (no buffer): what a failed start's
message quotes (`tail`) is on disk, and a full disk costs a known number of
bytes, never a buffer that fails again at every later write.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from lemonade_grpc.core.settings import BackendLogSettings

log = logging.getLogger(__name__)

ROTATED_SUFFIX = ".1"
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC

# Logs open in this process, which pruning must leave alone (a counter: a
# model's old backend may still be draining when its next one starts).
_in_use: collections.Counter[str] = collections.Counter()


def free_bytes(directory: Path) -> int | None:
    """Bytes an unprivileged writer may still write on `directory`'s filesystem; None when unknown."""
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


class BackendLog:
    """`path`, opened for appending by one backend run; writes within `settings`' bounds.

    Never raises from `write` or `close`: a log that cannot be written must
    not stop the pipe (the backend would block). Not thread-safe; one
    owner (the output pump). `close` is idempotent.
    """

    def __init__(
        self,
        path: Path,
        settings: BackendLogSettings,
        free: Callable[[], int | None] | None = None,
    ) -> None:
        """Open (create) `path`, first pruning its directory. Raises OSError when it cannot be opened."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.rotated_path = path.with_name(path.name + ROTATED_SUFFIX)
        self._settings = settings
        self._free = free if free is not None else lambda: free_bytes(path.parent)
        self._key = _key(path)
        _in_use[self._key] += 1  # before pruning: this one is kept
        try:
            prune(path.parent, settings.max_total_bytes)
            self._fd: int | None = os.open(path, _OPEN_FLAGS, 0o666)
        except BaseException:
            _release(self._key)
            raise
        self._size = os.fstat(self._fd).st_size
        # Where this run's output starts: in this file, and in the rotated
        # one when the run began there (None: it did not).
        self.run_start = self._size
        self._run_start_rotated: int | None = None
        if self._size >= settings.max_file_bytes:
            self._rotate()
        # Bytes dropped since the last note in the file, and why the first of them were.
        self.dropped = 0
        self.dropped_total = 0
        self._drop_reason = ""
        self._warned = False

    def write(self, chunk: bytes) -> None:
        """Append `chunk` if the bounds allow it, else drop and count it. Never raises."""
        if self._fd is None or not chunk:
            return
        full = self._size > 0 and self._size + len(chunk) > self._settings.max_file_bytes
        if full and not self._rotate():
            self._drop(len(chunk), f"cannot rotate {self.path.name} at its cap")
            return
        free = self._free()
        if free is not None and free - len(chunk) < self._settings.min_free_bytes:
            self._drop(
                len(chunk),
                f"less than {self._settings.min_free_mb} MiB would have been left free on the"
                " state directory's filesystem ([backend_logs] min_free_mb)",
            )
            return
        if self.dropped:
            self._note_dropped()
        self._append(chunk)

    def tail(self, limit: int) -> bytes:
        """The last `limit` bytes of this run's output (none of earlier runs'); b"" when unreadable."""
        try:
            with self.path.open("rb") as file:
                size = file.seek(0, os.SEEK_END)
                file.seek(max(self.run_start, size - limit))
                data = file.read()
            if len(data) < limit and self._run_start_rotated is not None:
                with self.rotated_path.open("rb") as file:
                    size = file.seek(0, os.SEEK_END)
                    file.seek(max(self._run_start_rotated, size - (limit - len(data))))
                    data = file.read() + data
        except OSError:
            return b""
        return data

    def close(self) -> None:
        """Write the note of what was dropped, if any, and close. Idempotent; never raises."""
        if self._fd is None:
            return
        if self.dropped:
            self._note_dropped()  # a hundred bytes, even below the reserve: the reader must know
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None
        _release(self._key)

    def _append(self, data: bytes) -> bool:
        """Write all of `data`; what cannot be written is dropped. Whether it was all written."""
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                self._size += written
                view = view[written:]
        except OSError as error:  # ENOSPC from another writer's bytes, EIO...
            self._drop(len(view), f"cannot write {self.path}: {error.strerror or error}")
            return False
        return True

    def _drop(self, count: int, reason: str) -> None:
        if not self.dropped:
            self._drop_reason = reason
        self.dropped += count
        self.dropped_total += count
        if not self._warned:
            self._warned = True
            log.warning("%s: dropping backend output: %s (said once per run)", self.path, reason)

    def _note_dropped(self) -> None:
        count, reason = self.dropped, self._drop_reason
        self.dropped = 0
        note = f"\n[lemonade-grpc] {count} bytes of backend output dropped here: {reason}\n"
        if not self._append(note.encode()):
            self.dropped += count  # said next time, with what this note failed to write

    def _rotate(self) -> bool:
        """`path` becomes `path.1` and a new `path` starts; False (nothing changed) when it cannot."""
        assert self._fd is not None
        try:
            os.replace(self.path, self.rotated_path)
            fd = os.open(self.path, _OPEN_FLAGS, 0o666)
        except OSError as error:
            log.warning("cannot rotate %s: %s", self.path, error)
            return False
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = fd
        self._size = 0
        # This run's earlier output is now in the rotated file (all of it, after a second rotation).
        self._run_start_rotated = self.run_start if self._run_start_rotated is None else 0
        self.run_start = 0
        return True


def _key(path: Path | str) -> str:
    """How `_in_use` names a file: absolute, without a syscall."""
    return os.path.abspath(path)


def _release(key: str) -> None:
    _in_use[key] -= 1
    if _in_use[key] <= 0:
        del _in_use[key]


def prune(directory: Path, max_total_bytes: int) -> None:
    """Delete the oldest logs of `directory` that no backend of this process writes, until all take
    at most `max_total_bytes`. Only `*.log` and `*.log.1` files are counted or deleted; a file that
    cannot be read or deleted is left (logged). Safe to call at any time."""
    found: list[tuple[float, Path, int]] = []
    total = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if not entry.name.endswith((".log", ".log" + ROTATED_SUFFIX)):
                    continue
                with contextlib.suppress(OSError):
                    if entry.is_file(follow_symlinks=False):
                        stat = entry.stat(follow_symlinks=False)
                        total += stat.st_size
                        found.append((stat.st_mtime, Path(entry.path), stat.st_size))
    except OSError as error:
        log.warning("cannot list backend logs in %s: %s", directory, error)
        return
    for _, path, size in sorted(found):
        if total <= max_total_bytes:
            return
        if _key(path) in _in_use:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("cannot delete old backend log %s: %s", path, error)
            continue
        log.info("deleted old backend log %s (%d bytes): [backend_logs] max_total_mb", path, size)
        total -= size
