"""How far a llama-server load has got: the model file's bytes taken in, and the stage its log names.

What the OS shows of the backend is the signal (issue 12): on a cold load
of a 3.3 GB model, the bytes it had read (`/proc/PID/io`) and its resident
pages of the model file (`/proc/PID/smaps`) each rose linearly from 0 to
the file's size over the first two thirds of the load; the rest was the KV
cache's allocation and a warm-up run. llama-server names those stages in
its log. `ProgressEstimate` combines the two into one monotonic fraction:

    reading weights          0    -> 0.90   bytes in / file size
    allocating KV, warm-up   0.90            a context or KV line, or every byte in
    initializing slots       0.95            "load_model: initializing"
    model loaded             0.99            "model loaded" (then it listens: READY, 1.0)

The pure part (`ProgressEstimate`, `stage_of`) is separate from reading /proc
(`ModelBytes`), which is called off the event loop.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path

WEIGHTS_SHARE = 0.90
# Never 1.0 before READY: READY alone says "done".
LAST_BEFORE_READY = 0.99


class Stage(enum.IntEnum):
    """llama-server's load stages, in order."""

    WEIGHTS = 0
    CONTEXT = 1
    SLOTS = 2
    LOADED = 3


STAGE_FLOOR = {Stage.WEIGHTS: 0.0, Stage.CONTEXT: WEIGHTS_SHARE, Stage.SLOTS: 0.95, Stage.LOADED: 0.99}
STAGE_MESSAGE = {
    Stage.CONTEXT: "allocating the KV cache and warming up",
    Stage.SLOTS: "initializing slots",
    Stage.LOADED: "model loaded; starting the HTTP server",
}

# Lines of llama-server's log (default verbosity and -lv 4) that begin a stage.
_STAGE_MARKS = (
    (Stage.LOADED, ("llama_server: model loaded", "main: model loaded")),
    (Stage.SLOTS, ("load_model: initializing",)),
    (Stage.CONTEXT, ("llama_context:", "llama_kv_cache", "warming up the model")),
)


def stage_of(line: str) -> Stage | None:
    """The stage a llama-server log line begins, if any."""
    for stage, marks in _STAGE_MARKS:
        if any(mark in line for mark in marks):
            return stage
    return None


def _mib(size: int) -> str:
    return f"{size / (1 << 20):,.0f} MiB"


@dataclass
class ProgressEstimate:
    """The progress of one load: feed it log lines and byte counts; read `fraction` and `message`."""

    file_bytes: int
    bytes_in: int = 0
    stage: Stage = Stage.WEIGHTS
    _fraction: float = 0.0

    def line(self, text: str) -> None:
        """A line of the backend's log: it may begin a later stage (never an earlier one)."""
        stage = stage_of(text)
        if stage is not None and stage > self.stage:
            self.stage = stage

    def read(self, bytes_in: int) -> None:
        """How many bytes of the model file the backend has taken in (read or resident)."""
        self.bytes_in = max(self.bytes_in, bytes_in)
        if self.stage is Stage.WEIGHTS and self.file_bytes > 0 and self.bytes_in >= self.file_bytes:
            self.stage = Stage.CONTEXT  # every byte is in: what is left is the context and the warm-up

    @property
    def fraction(self) -> float:
        """Monotonic, 0 to `LAST_BEFORE_READY`."""
        weights = min(1.0, self.bytes_in / self.file_bytes) if self.file_bytes > 0 else 0.0
        now = max(STAGE_FLOOR[self.stage], WEIGHTS_SHARE * weights)
        self._fraction = min(LAST_BEFORE_READY, max(self._fraction, now))
        return self._fraction

    @property
    def message(self) -> str:
        if self.stage is Stage.WEIGHTS:
            return f"reading weights: {_mib(min(self.bytes_in, self.file_bytes))} of {_mib(self.file_bytes)}"
        return STAGE_MESSAGE[self.stage]


def _mapped_resident(pid: int, target: str) -> int:
    """Resident bytes of process `pid`'s mappings of file `target` (/proc/PID/smaps)."""
    resident = 0
    with open(f"/proc/{pid}/smaps", encoding="utf-8", errors="replace") as smaps:
        inside = False
        for line in smaps:
            if not line[0].isupper():  # a mapping's header: "start-end perms offset dev inode path"
                inside = line.rstrip("\n").endswith(target)
            elif inside and line.startswith("Rss:"):
                resident += int(line.split()[1]) * 1024
    return resident


def _field(path: str, name: str) -> int:
    """The number after `name` in a /proc file of `name: value [kB]` lines (kB made bytes)."""
    with open(path, encoding="ascii") as lines:
        for line in lines:
            if line.startswith(name):
                parts = line.split()
                return int(parts[1]) * (1024 if parts[-1] == "kB" else 1)
    return 0


class ModelBytes:
    """Bytes of a model file that process `pid` has taken in: its resident pages of the file (mmap
    loading) or the bytes it has read (`--load-mode none`), whichever is more; 0 when unreadable.

    The resident pages of the file alone are in /proc/PID/smaps, whose cost
    grows with what is resident (4 ms at 400 MB: about 0.7 s for a 70 GB
    model). It is read once, at the first sample, to learn how much of the
    process's file-backed memory (`RssFile` in /proc/PID/status, cheap at any
    size) is not the model (the program and its libraries); later samples
    take `RssFile` less that.
    """

    def __init__(self, pid: int, model: Path) -> None:
        self._pid = pid
        self._target = os.path.realpath(model)
        self._other_files: int | None = None

    def read(self) -> int:
        try:
            file_backed = _field(f"/proc/{self._pid}/status", "RssFile:")
            if self._other_files is None:
                mapped = _mapped_resident(self._pid, self._target)
                self._other_files = max(0, file_backed - mapped)
            resident = max(0, file_backed - self._other_files)
            read = _field(f"/proc/{self._pid}/io", "rchar:")
        except (OSError, ValueError, IndexError):
            return 0
        return max(resident, read)
