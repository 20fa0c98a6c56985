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

from lemonade_grpc.backends.output import OutputPump

SETPRIV = shutil.which("setpriv")
# After the group is killed, how long the rest of its output may take to arrive.
OUTPUT_DRAIN_SECONDS = 1.0


class BackendProcess:
    """A running backend process and its process group.

    Created with `spawn`; `stop` is idempotent and safe to call concurrently.
    """

    def __init__(
        self, process: asyncio.subprocess.Process, log_path: Path, log_offset: int, output: OutputPump
    ) -> None:
        self._process = process
        # Its output, followed line by line (and copied to `log_path`).
        self.output = output
        self.log_path = log_path
        # Where this run's output starts in the log, which earlier runs of
        # the same model share (issue 9, finding 14: a failed start's
        # message showed lines of earlier runs).
        self.log_offset = log_offset
        self.pid = process.pid
        self._stopping: asyncio.Task[int] | None = None

    @classmethod
    async def spawn(
        cls, argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None
    ) -> BackendProcess:
        """Start `argv`, its output (stdout and stderr) followed and appended to `log_path`.

        Raises OSError when the program cannot be started.
        """
        command = list(argv)
        if SETPRIV is not None:
            command = [SETPRIV, "--pdeathsig", "KILL", "--", *command]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("ab")
        try:
            offset = os.fstat(log.fileno()).st_size
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        except BaseException:
            log.close()
            raise
        assert process.stdout is not None
        return cls(process, log_path, offset, OutputPump(process.stdout, log))

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
        await self.output.close(OUTPUT_DRAIN_SECONDS)
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

    def tree(self) -> list[psutil.Process]:
        """The process and its live descendants; [] when it is gone."""
        try:
            process = psutil.Process(self.pid)
            return [process, *process.children(recursive=True)]
        except psutil.Error:
            return []

    def listens_on(self, port: int) -> bool:
        """Whether the process or one of its descendants holds a TCP LISTEN socket on loopback `port`.

        Proof that what answers on the port is ours (issue 9, finding 8).
        Reads /proc: meant for once per start, not for every poll. False once
        the process has been reaped (its pid may be someone else's by then).
        """
        if self.returncode is not None:
            return False
        for process in self.tree():
            with contextlib.suppress(psutil.Error):
                connections = process.net_connections(kind="tcp")
                if any(_is_loopback_listener(c.status, c.laddr, port) for c in connections):
                    return True
        return False

    def log_tail(self, limit: int = 2000) -> str:
        """The last `limit` bytes of this process's own output (none of earlier runs'), for error messages.

        "" when the log cannot be read.
        """
        try:
            with self.log_path.open("rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(self.log_offset, size - limit))
                return log.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""


# The addresses whose listener answers a connection to 127.0.0.1.
_LOOPBACK_REACHABLE = frozenset({"127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1"})


def _is_loopback_listener(status: str, laddr: tuple[object, ...], port: int) -> bool:
    """Whether a socket (its status and local address) listens where 127.0.0.1:`port` reaches."""
    return (
        status == psutil.CONN_LISTEN
        and len(laddr) == 2
        and laddr[1] == port
        and laddr[0] in _LOOPBACK_REACHABLE
    )


def port_holder(port: int) -> str | None:
    """Who holds a TCP LISTEN socket on loopback `port`: "pid N (name)", "another user's process", or None.

    Scans every socket of the host (/proc): for error paths only.
    """
    try:
        connections = psutil.net_connections(kind="tcp")
    except psutil.Error:
        return None
    for connection in connections:
        if _is_loopback_listener(connection.status, connection.laddr, port):
            if connection.pid is None:
                return "another user's process"
            try:
                name = psutil.Process(connection.pid).name()
            except psutil.Error:
                name = "gone"
            return f"pid {connection.pid} ({name})"
    return None
