"""A record of live backend processes in the state directory.

`setpriv --pdeathsig` makes the kernel kill backends when the control plane
dies, but a backend started in the instant before the death signal was set,
or one whose wrapper changed credentials (which clears it), can survive. Each
backend is recorded here on spawn and forgotten on stop; at boot, whatever is
still recorded and still running is a survivor of the last run and is killed.
A record holds the process's start time, so a pid reused by an unrelated
process is never touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from lemonade_grpc.files import write_atomically

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Record:
    pid: int
    model: str
    create_time: float


class BackendRegistry:
    """The live-backend record of one state directory. Loop thread only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: dict[int, Record] = {}

    def add(self, pid: int, model: str) -> None:
        """Record a freshly spawned backend."""
        try:
            create_time = psutil.Process(pid).create_time()
        except psutil.Error:
            return  # already gone: nothing to reap later
        self._records[pid] = Record(pid, model, create_time)
        self._save()

    def remove(self, pid: int) -> None:
        """Forget a backend that has exited. Safe to call twice."""
        if self._records.pop(pid, None) is not None:
            self._save()

    def reap_stale(self) -> list[Record]:
        """Kill the process groups of recorded backends that still run; return them.

        Called once at boot, before anything is spawned. An unreadable record
        is logged and discarded: it cannot name processes safely.
        """
        stale: list[Record] = []
        for record in self._load():
            try:
                process = psutil.Process(record.pid)
                # A zombie is dead, waiting for its reaper (PID 1 after we died).
                alive = (
                    process.create_time() == record.create_time and process.status() != psutil.STATUS_ZOMBIE
                )
            except psutil.Error:
                alive = False
            if alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(record.pid, signal.SIGKILL)
                log.warning(
                    "reaped stale backend of %s, pid %d, left by a previous run", record.model, record.pid
                )
                stale.append(record)
        self._records.clear()
        self._save()
        return stale

    def _load(self) -> list[Record]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return [Record(int(r["pid"]), str(r["model"]), float(r["create_time"])) for r in data["backends"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("ignoring unreadable backend record %s: %s", self.path, error)
            return []

    def _save(self) -> None:
        backends = [asdict(r) for r in self._records.values()]
        write_atomically(self.path, json.dumps({"backends": backends}, indent=1))
