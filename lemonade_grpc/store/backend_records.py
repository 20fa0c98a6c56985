"""A record of live backend processes in the state directory.

`setpriv --pdeathsig` makes the kernel kill backends when the control plane
dies, but a backend started in the instant before the death signal was set,
or one whose wrapper changed credentials (which clears it), can survive. Each
backend is recorded here on spawn and forgotten on stop; at boot, whatever is
still recorded and still running is a survivor of the last run and is killed.
A record holds the process's start time, so a pid reused by an unrelated
process is never touched.

A record is written once the process exists, so a crash of ours in between
would leave a backend nobody tracks (issue 18 finding 10: 30 SIGKILLs during
Loads without `setpriv` left 4 live backends, none recorded). So each
backend's environment also carries the state directory it belongs to
(`OWNER_VARIABLE`), set before it is spawned, and inherited by whatever it
starts: at boot, every live process of ours that carries this state
directory's mark is a survivor too. The state directory's lock makes the
mark unambiguous: only one server uses a state directory at a time.

A backend that cannot be recorded must not run (issue 9, finding 3: with a
state directory that could not be written, each load left one more live,
untracked process): `add` raises, and the caller stops the process. Writes
go through an `AtomicWriter`, off the event loop (finding 20).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from lemonade_grpc.core import bounds
from lemonade_grpc.store.files import AtomicWriter

log = logging.getLogger(__name__)


# In a backend's environment: the state directory whose server started it, and its model.
OWNER_VARIABLE = "LEMONADE_GRPC_BACKEND_OF"
MODEL_VARIABLE = "LEMONADE_GRPC_BACKEND_MODEL"


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
        self._writer = AtomicWriter(path)

    def __contains__(self, pid: object) -> bool:
        return pid in self._records

    @property
    def owner(self) -> str:
        """The mark of this state directory's backends: the directory's absolute path."""
        return str(self.path.parent.resolve())

    def marks(self, model: str) -> dict[str, str]:
        """The variables a backend of `model` is spawned with: a boot finds it even unrecorded."""
        return {OWNER_VARIABLE: self.owner, MODEL_VARIABLE: model}

    async def add(self, pid: int, model: str) -> None:
        """Record a freshly spawned backend; return once the record is durable.

        Raises OSError when the file cannot be written: the caller must then
        stop the process (it would survive a crash of ours unrecorded). The
        record stays in memory until `remove`, so a later successful write
        still lists the process while it runs. A process already gone is not
        recorded (nothing to reap later).
        """
        try:
            create_time = psutil.Process(pid).create_time()
        except psutil.Error:
            return
        self._records[pid] = Record(pid, model, create_time)
        await self._save()

    async def remove(self, pid: int) -> None:
        """Forget a backend that has exited. Safe to call twice; never raises.

        A failed write is logged, not raised: the process is gone whatever
        the file says, and a stale record is harmless (its start time no
        longer matches any process at the next boot).
        """
        if self._records.pop(pid, None) is None:
            return
        try:
            await self._save()
        except OSError as error:
            log.warning("cannot forget backend pid %d in %s: %s", pid, self.path, error)

    async def reap_stale(self) -> list[Record]:
        """Kill the process groups of recorded backends that still run; return them.

        Called once at boot, before anything is spawned (and after the state
        directory's lock is held: a second server must not reap the first
        one's backends, finding 5). An unreadable record is logged and
        discarded: it cannot name processes safely. Failing to rewrite the
        file is logged, not raised: the next `add` writes it again, and the
        records left meanwhile match no live process.
        """
        stale: list[Record] = []
        records, found = self._load()
        for record in records:
            if record.pid == os.getpid() or record.pid == os.getpgid(0):
                continue  # never our own group, whatever a record says
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
        stale.extend(self._reap_marked({record.pid for record in stale}))
        self._records.clear()
        if found:  # absent: nothing to clear, and nothing written
            try:
                await self._save()
            except OSError as error:
                log.warning("cannot rewrite %s: %s", self.path, error)
        return stale

    def _reap_marked(self, reaped: set[int]) -> list[Record]:
        """Kill the process groups of live processes marked as this state directory's backends.

        Those a record named are in `reaped` already. Only processes whose
        environment can be read (our own user's) are looked at; never our
        own process or group.
        """
        found: list[Record] = []
        ours = {os.getpid(), os.getpgid(0)}
        for process in psutil.process_iter(["environ", "create_time", "status"]):
            environ = process.info["environ"] or {}
            if environ.get(OWNER_VARIABLE) != self.owner or process.pid in ours | reaped:
                continue
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            try:
                group = os.getpgid(process.pid)
                if group in reaped:
                    continue  # in the group of a recorded backend, killed above
                if group not in ours:
                    os.killpg(group, signal.SIGKILL)
                os.kill(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
            model = environ.get(MODEL_VARIABLE, "?")[: bounds.MODEL_NAME_LENGTH]
            log.warning(
                "reaped stale backend of %s, pid %d, left unrecorded by a previous run",
                model,
                process.pid,
            )
            found.append(Record(process.pid, model, process.info["create_time"] or 0.0))
        return found

    def _load(self) -> tuple[list[Record], bool]:
        """The records on disk, and whether there is a file (readable or not) to rewrite.

        Each record is checked on its own; one that is not exactly what
        `_save` writes is logged and left out (it cannot name a process
        safely), the others are kept.
        """
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            entries = data["backends"]
            if not isinstance(entries, list):
                raise TypeError("'backends' is not a list")
        except FileNotFoundError:
            return [], False
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
            log.warning("ignoring unreadable backend records %s: %s", self.path, bounds.echo(str(error)))
            return [], True
        records = []
        for entry in entries:
            record = _record(entry)
            if record is None:
                log.warning(
                    "ignoring an unreadable backend record in %s: %s", self.path, bounds.echo(repr(entry))
                )
            else:
                records.append(record)
        return records, True

    async def _save(self) -> None:
        backends = [asdict(r) for r in self._records.values()]
        await self._writer.write(json.dumps({"backends": backends}, indent=1))


# The largest pid Linux hands out (pid_max can be set up to 2^22).
_PID_MAX = 1 << 22


def _record(entry: object) -> Record | None:
    """`entry` as a record when it holds exactly what `_save` writes, else None."""
    if not isinstance(entry, dict):
        return None
    pid, model, create_time = entry.get("pid"), entry.get("model"), entry.get("create_time")
    if type(pid) is not int or not 1 < pid <= _PID_MAX or not isinstance(model, str):
        return None
    if not isinstance(create_time, int | float) or isinstance(create_time, bool):
        return None
    if not math.isfinite(create_time):
        return None
    return Record(pid, model, float(create_time))
