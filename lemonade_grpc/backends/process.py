"""Backend processes: spawn so they cannot outlive us, stop them for sure.

No orphans (DESIGN.md item 7):
- `PR_SET_PDEATHSIG` is set by util-linux's `setpriv --pdeathsig KILL`, not by
  a Python `preexec_fn`, which is unsafe in a process where gRPC's core runs
  threads.
- The death signal fires when the *thread* that forked the child ends, not the
  process (Lemonade #2310), so spawning happens on the event loop's thread,
  which lives as long as the server.
- Each backend leads its own process group (`start_new_session`, done by the C
  fork helper, no Python in the child), and stop signals the whole group, so a
  wrapper script's children go too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Sequence
from pathlib import Path

import psutil

SETPRIV = shutil.which("setpriv")


class BackendProcess:
    """A running backend process and its process group.

    Created with `spawn`; `stop` is idempotent and safe to call concurrently.
    """

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self._process = process
        self.log_path = log_path
        self.pid = process.pid
        self._stopping: asyncio.Task[int] | None = None

    @classmethod
    async def spawn(
        cls, argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None
    ) -> BackendProcess:
        """Start `argv` with its output appended to `log_path`.

        Raises OSError when the program cannot be started.
        """
        command = list(argv)
        if SETPRIV is not None:
            command = [SETPRIV, "--pdeathsig", "KILL", "--", *command]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        return cls(process, log_path)

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    async def wait(self) -> int:
        """Wait for the process to exit; return its exit status (negative: signal)."""
        return await self._process.wait()

    async def stop(self, grace: float) -> int:
        """SIGTERM the process group, SIGKILL it after `grace` seconds; return the exit status."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        return await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> int:
        self._signal_group(signal.SIGTERM)
        try:
            status = await asyncio.wait_for(self._process.wait(), grace)
        except TimeoutError:
            self._signal_group(signal.SIGKILL)
            status = await self._process.wait()
        # The leader is gone; make sure nothing it started lingers in its group.
        self._signal_group(signal.SIGKILL)
        return status

    def kill_group(self) -> None:
        """SIGKILL the process group now, without waiting for it to exit."""
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def rss_bytes(self) -> int:
        """Resident memory of the process and its children; 0 when it is gone."""
        try:
            process = psutil.Process(self.pid)
            total = process.memory_info().rss
            for child in process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    total += child.memory_info().rss
            return int(total)
        except psutil.Error:
            return 0

    def log_tail(self, limit: int = 2000) -> str:
        """The end of the process's output, for error messages."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(0, size - limit))
                return log.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""
