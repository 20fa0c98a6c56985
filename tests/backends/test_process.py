"""Backend processes: the process tree, listening sockets, and a stop that is prompt whatever holds the pipe.

In process, real processes: the fake backend (tests/fake_backend.py) behind
small wrapper scripts that misbehave (issue 12's attacks), and the kernel's
own tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import eventually, launch_backend
from in_process import FAKE, shell_spec
from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.backends.process import (
    _diag_listeners,
    _proc_listeners,
    descendants,
    loopback_listeners,
    socket_inodes,
)
from lemonade_grpc.testing import is_gone


def test_the_kernels_listening_sockets_agree_with_proc_net() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        inode = os.fstat(listener.fileno()).st_ino
        assert loopback_listeners(port) == {inode}
        assert socket_inodes(os.getpid()) >= {inode}
        assert sorted(_diag_listeners(socket.AF_INET) + _diag_listeners(socket.AF_INET6)) == sorted(
            _proc_listeners()
        )
    assert loopback_listeners(port) == set()


def test_descendants_are_the_process_tree(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    # The marker is written by the last shell to fork, with no process of its own
    # (issue 18 finding 12: `touch` after the subshell's fork raced it, and was
    # itself a fifth child while it ran).
    script = f"sleep 30 & sleep 30 & (sleep 30 & : > {ready}; wait) & wait"
    shell = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        expected = sorted(p.pid for p in psutil.Process(shell.pid).children(recursive=True))
        assert len(expected) == 4  # two sleeps, a subshell and its sleep
        assert sorted(descendants(shell.pid)) == expected
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()
    assert descendants(shell.pid) == []


@pytest.fixture
def strays() -> Iterator[Path]:
    """A file where helper processes write their pids; each still running at the end is killed."""
    path = Path(f"/tmp/lemonade-attack-{os.getpid()}-{time.monotonic_ns()}.pids")
    yield path
    kill_strays(path)
    path.unlink(missing_ok=True)


def stray_pids(path: Path) -> list[int]:
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


def kill_strays(path: Path) -> None:
    for pid in stray_pids(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- the output pipe held open by someone else -------------------------------------------------


async def test_stop_is_prompt_and_closes_the_pipe_when_a_process_outside_the_group_holds_it(
    tiny_model: Path, tmp_path: Path, spawned: list[Backend], strays: Path
) -> None:
    # A helper that left the backend's process group (setsid) but kept its stdout: our pipe.
    script = f"setsid sh -c 'echo $$ >> {strays}; exec sleep 60' & exec {FAKE}"
    spec = shell_spec("escaped", tiny_model, script)
    backend = await launch_backend(spec, tmp_path / "logs", spawned)
    await eventually(strays.exists, 5, "the helper to start")
    try:
        await asyncio.wait_for(backend.stop(1.0), 10)
        # The stop is over while the helper still holds the pipe: our end is closed,
        # not left open for as long as the helper lives (was: one descriptor per such backend).
        helper_alive = any(not is_gone(pid) for pid in stray_pids(strays))
        # Done means our read end is closed (`OutputPump._finish`). (A count of this process's
        # descriptors is no measure inside the whole suite: other tests' objects come and go.)
        pumped = backend.process.output.done.is_set()
    finally:
        kill_strays(strays)
    assert is_gone(backend.pid)
    assert (helper_alive, pumped) == (True, True)


async def test_a_short_lived_descendant_does_not_hide_the_whole_process_tree(
    tiny_model: Path, tmp_path: Path, spawned: list[Backend]
) -> None:
    # The shell stays the leader (no exec): the server listens in a child, and another child
    # keeps starting short-lived processes (a wrapper's probes, a server's subprocess calls).
    script = f"(while :; do /bin/true; done) & {FAKE}; wait"
    backend = await launch_backend(shell_spec("wrapped", tiny_model, script), tmp_path / "logs", spawned)
    try:
        checks = 200
        empty = sum(not backend.process.tree() for _ in range(checks))
        no_memory = sum(backend.process.rss_bytes() == 0 for _ in range(checks))
        not_ours = sum(not backend.process.listens_on(backend.port) for _ in range(checks))
    finally:
        await backend.stop(1.0)
    # Each of those is a live process tree that listens on its port.
    assert (empty, no_memory, not_ours) == (0, 0, 0)
