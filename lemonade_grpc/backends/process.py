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
import socket
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

import psutil

from lemonade_grpc.backends.logfile import BackendLog
from lemonade_grpc.backends.output import OutputPump
from lemonade_grpc.core.settings import BackendLogSettings

SETPRIV = shutil.which("setpriv")
# After the group is killed, how long the rest of its output may take to arrive.
OUTPUT_DRAIN_SECONDS = 0.1


class BackendProcess:
    """A running backend process and its process group.

    Created with `spawn`; `stop` is idempotent and safe to call concurrently.
    """

    def __init__(self, process: asyncio.subprocess.Process, output: OutputPump) -> None:
        self._process = process
        # Its output, followed line by line (and copied to its log, `output.log`).
        self.output = output
        self.log_path = output.log.path
        self.pid = process.pid
        self._stopping: asyncio.Task[int] | None = None

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        log_settings: BackendLogSettings | None = None,
    ) -> BackendProcess:
        """Start `argv`, its output (stdout and stderr) followed and appended to `log_path`.

        The log is kept within `log_settings` (default: `BackendLogSettings()`;
        issue 18 finding 6). Raises OSError when the program cannot be started
        or its log cannot be opened.
        """
        command = list(argv)
        if SETPRIV is not None:
            command = [SETPRIV, "--pdeathsig", "KILL", "--", *command]
        log = BackendLog(log_path, log_settings or BackendLogSettings())
        read_fd, write_fd = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        except BaseException:
            os.close(read_fd)
            log.close()
            raise
        finally:
            os.close(write_fd)  # the child has its copy: EOF comes when the last writer is gone
        return cls(process, OutputPump(read_fd, log))

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

    def stopped(self) -> bool:
        """Whether the process is stopped (SIGSTOP, a tracer) or a zombie: one read of /proc/PID/stat.

        False when it cannot be read (gone: its exit is seen elsewhere).
        """
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            return False
        # "PID (comm) S ...": the name may hold spaces and parentheses; the state follows the last ")".
        state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
        return state in (b"T", b"t", b"Z")

    def rss_bytes(self) -> int:
        """Resident memory of the process and its children; 0 when it is gone."""
        total = 0
        for process in self.tree():
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
        return total

    def tree(self) -> list[psutil.Process]:
        """The process and its live descendants; [] when it is gone.

        A descendant that exits while the tree is read is left out, not the
        whole tree with it (issue 12: a backend whose child kept starting
        short-lived processes read as no tree, 0 bytes and not listening).
        """
        try:
            leader = psutil.Process(self.pid)
        except psutil.Error:
            return []
        found = [leader]
        for pid in descendants(self.pid):
            with contextlib.suppress(psutil.Error):
                found.append(psutil.Process(pid))
        return found

    def listens_on(self, port: int) -> bool:
        """Whether the process or one of its descendants holds a TCP LISTEN socket on loopback `port`.

        Proof that what answers on the port is ours (issue 9, finding 8).
        Reads /proc: meant for once per start, not for every poll. False once
        the process has been reaped (its pid may be someone else's by then).
        """
        if self.returncode is not None:
            return False
        listeners = loopback_listeners(port)
        if not listeners:
            return False
        # The process itself first (llama-server): its descendants are found by
        # scanning every process of the host, several milliseconds.
        if socket_inodes(self.pid) & listeners:
            return True
        return any(socket_inodes(child.pid) & listeners for child in self.tree()[1:])

    def log_tail(self, limit: int = 2000) -> str:
        """The last `limit` bytes of this process's own output (none of earlier runs'), for error messages.

        Earlier runs of the same model share the log (issue 9, finding 14: a
        failed start's message showed lines of earlier runs). "" when the
        log cannot be read.
        """
        return self.output.log.tail(limit).decode("utf-8", "replace").strip()


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


# sock_diag (netlink), as `ss` asks the kernel: only the listening sockets, in microseconds.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x301
_NLMSG_DONE, _NLMSG_ERROR = 3, 2
_TCP_LISTEN = 10


def _diag_listeners(family: int) -> list[tuple[str, int, int]]:
    """(address, port, inode) of every listening TCP socket of `family`, from the kernel's sock_diag."""
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN) + bytes(48)
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0)
    found: list[tuple[str, int, int]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as diag:
        diag.settimeout(1.0)
        diag.sendall(header + request)
        while True:
            data = diag.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR or length < 16:
                    raise OSError("sock_diag answered with an error")
                body = data[offset + 16 : offset + length]  # struct inet_diag_msg
                size = 4 if body[0] == socket.AF_INET else 16
                (port,) = struct.unpack_from("!H", body, 4)
                (inode,) = struct.unpack_from("=I", body, 68)
                found.append((socket.inet_ntop(body[0], body[8 : 8 + size]), port, inode))
                offset += (length + 3) & ~3


def _proc_listeners() -> list[tuple[str, int, int]]:
    """The same from /proc/net/tcp and tcp6 (where sock_diag is missing): it walks every socket, slowly."""
    found: list[tuple[str, int, int]] = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with contextlib.suppress(OSError, ValueError, IndexError), open(table, encoding="ascii") as lines:
            next(lines, None)  # the header
            for line in lines:
                fields = line.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                hex_address, _, hex_port = fields[1].partition(":")
                raw = bytes.fromhex(hex_address)  # 32-bit words in host order
                if sys.byteorder == "little":
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((socket.inet_ntop(family, raw), int(hex_port, 16), int(fields[9])))
    return found


def loopback_listeners(port: int) -> set[int]:
    """Inodes of the TCP sockets listening where 127.0.0.1:`port` reaches.

    Asked of the kernel's sock_diag, which lists only listening sockets: what
    psutil's `net_connections` read from /proc/net/tcp{,6} took 7 ms here (it
    walks the whole connection table), and a start waited for it (issue 12:
    most of the 9 ms the control plane added to a backend's start).
    """
    try:
        listeners = _diag_listeners(socket.AF_INET) + _diag_listeners(socket.AF_INET6)
    except OSError:
        listeners = _proc_listeners()
    return {inode for address, bound, inode in listeners if bound == port and address in _LOOPBACK_REACHABLE}


# Linux lists each task's children in /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN).
_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def descendants(pid: int) -> list[int]:
    """The pids of `pid`'s descendants, from /proc's children lists.

    psutil's `children(recursive=True)` reads every process of the host to
    find them: about a millisecond here, paid twice on the way to READY (the
    model's memory is in its status). This reads the few files of the tree.
    """
    if not _PROC_CHILDREN:
        with contextlib.suppress(psutil.Error):
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        return []
    found: list[int] = []
    parents = [pid]
    while parents:
        parent = parents.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            with (
                contextlib.suppress(OSError, ValueError),
                open(f"/proc/{parent}/task/{task}/children") as file,
            ):
                children = [int(child) for child in file.read().split()]
                found += children
                parents += children
    return found


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds open (empty when it is gone or not ours to read)."""
    inodes: set[int] = set()
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for descriptor in descriptors:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{descriptor}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


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
