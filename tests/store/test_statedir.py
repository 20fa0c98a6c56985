"""The state directory: one owner (lock), off-loop coalescing writes, the descriptor limit (issue 9)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import psutil
import pytest

from conftest import ServerFactory, connect, eventually, fake_model
from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as ipb
from lemonade_grpc.store import files
from lemonade_grpc.store.files import AtomicWriter
from lemonade_grpc.store.statedir import LOCK_NAME, StateDirLock, StateDirLocked, raise_fd_limit
from lemonade_grpc.testing import TAG_VAR, is_gone, serve_command, tagged_processes
from rpc_errors import error_info

# --- finding 5: one owner per state directory ----------------------------------------------------


def snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `directory` with its modification time and content."""
    return {
        str(path.relative_to(directory)): (path.stat().st_mtime_ns, path.read_bytes())
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def run_second_server(config_path: Path, state_dir: Path, seconds: float = 15) -> tuple[int, str]:
    """Run `serve` on `state_dir` to its end; return its exit status and output. Killed if still running."""
    process = subprocess.Popen(
        [*serve_command(state_dir), "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, TAG_VAR: uuid.uuid4().hex},
    )
    try:
        output, _ = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        pytest.fail(f"the second server kept running:\n{output.decode(errors='replace')}")
    return process.returncode, output.decode(errors="replace")


async def test_a_second_server_on_the_same_state_dir_touches_nothing(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    state_dir = tmp_path / "shared-state"
    config = fake_model("a", tiny_model)
    first = servers.start(config, state_dir=state_dir)
    async with connect(first.address) as client:
        status = await client.ready("a", pinned=True)
        pid = status.pid
        # The lock's descriptor is close-on-exec: a surviving backend must never hold it.
        assert str(state_dir / LOCK_NAME) not in {f.path for f in psutil.Process(pid).open_files()}
        before = snapshot(state_dir)
        assert {"backends.json", "pins.json"} <= set(before)

        exit_status, output = run_second_server(tmp_path / "config0.toml", state_dir)

        assert exit_status == 2, output
        lines = output.strip().splitlines()
        assert len(lines) == 1, output
        assert str(state_dir) in lines[0]
        assert f"pid {first.process.pid}" in lines[0]
        assert snapshot(state_dir) == before  # no reaping, no pins, no logs rewritten
        assert not is_gone(pid)
        assert await client.pids() == {"a": pid}
        replies = [r async for r in client.inference.Complete(ipb.CompleteRequest(model="a", prompt="hi"))]
        assert replies[-1].usage.completion_tokens > 0
    assert first.process.poll() is None


async def test_a_server_killed_outright_leaves_its_state_dir_to_the_next(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    state_dir = tmp_path / "shared-state"
    config = fake_model("a", tiny_model)
    first = servers.start(config, state_dir=state_dir)
    first.stop(signal.SIGKILL)  # the kernel drops the lock with the process: no stale lock
    second = servers.start(config, state_dir=state_dir)
    async with connect(second.address) as client:
        await client.ready("a")


def test_the_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    lock = StateDirLock.acquire(tmp_path / "state")
    try:
        assert (tmp_path / "state" / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        # flock belongs to the open file description: a second open conflicts, even in this process.
        with pytest.raises(StateDirLocked) as raised:
            StateDirLock.acquire(tmp_path / "state")
        assert raised.value.holder_pid == os.getpid()
        assert str(tmp_path / "state") in str(raised.value)
    finally:
        lock.release()
    lock.release()  # idempotent
    again = StateDirLock.acquire(tmp_path / "state")
    assert again.held
    again.release()
    assert not again.held


async def test_an_unwritable_state_dir_fails_the_load_over_grpc_and_leaves_no_backend(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    server = servers.start(fake_model("a", tiny_model), state_dir=state_dir)
    # The disk turns unwritable under a running server (full, made immutable): a directory
    # where the registry's temporary file goes refuses the write, even for root.
    blocker = state_dir / ".backends.json.tmp"
    blocker.mkdir()
    async with connect(server.address) as client:
        for _ in range(2):  # each retry fails the same way, and cleanly
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await client.load_all("a")
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(raised.value).reason == "STATE_WRITE_FAILED"
            assert "backends.json" in (raised.value.details() or "")
            others = [p.pid for p in tagged_processes({server.tag}) if p.pid != server.process.pid]
            assert others == [], "a backend that could not be recorded runs"
            assert await client.pids() in ({}, {"a": 0})
        blocker.rmdir()
        status = await client.ready("a")
        assert not is_gone(status.pid)


# --- finding 7: file descriptors ---------------------------------------------------------------


def test_the_soft_descriptor_limit_is_raised_to_the_hard_limit() -> None:
    program = (
        "import resource\n"
        "from lemonade_grpc.store.statedir import raise_fd_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "print(raise_fd_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True)
    returned, soft, hard = (int(n) for n in result.stdout.split())
    assert returned == soft == hard > 256
    assert raise_fd_limit() >= 1024  # and twice is harmless


# --- finding 20: state writes off the loop, serialized and coalesced ---------------------------


class SlowWrites:
    """Replaces the blocking write with a slow one that records what ran, where."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: float = 0.2) -> None:
        self.texts: list[str] = []
        self.threads: set[str] = set()
        self.concurrent = 0
        self.most_concurrent = 0
        self.release = threading.Event()
        original = files.write_atomically

        def write(path: Path, text: str) -> None:
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
            self.threads.add(threading.current_thread().name)
            self.release.wait(seconds)
            original(path, text)
            self.texts.append(text)
            self.concurrent -= 1

        monkeypatch.setattr(files, "write_atomically", write)


async def test_writes_run_off_the_loop_one_at_a_time_and_the_latest_text_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowWrites(monkeypatch, seconds=30)  # held until the test releases it
    writer = AtomicWriter(tmp_path / "state.json")
    first = asyncio.create_task(writer.write("0"))
    await asyncio.sleep(0)  # the first write starts alone
    rest = [asyncio.create_task(writer.write(str(n))) for n in range(1, 10)]
    await eventually(lambda: slow.concurrent == 1, 10, "the first write to be under way")
    # The loop stays free while the file is written: it turns, the write still
    # held (issue 18 finding 12: was a count of 10 ms ticks during a 0.2 s write).
    for _ in range(5):
        await asyncio.sleep(0.01)
        assert not first.done()
    slow.release.set()
    await asyncio.gather(first, *rest)
    assert slow.texts == ["0", "9"]  # 1..8 coalesced into the newest text
    assert slow.most_concurrent == 1
    assert threading.current_thread().name not in slow.threads
    assert (tmp_path / "state.json").read_text() == "9"
    assert not writer.busy


async def test_a_failed_write_raises_for_its_callers_and_the_next_write_tries_again(tmp_path: Path) -> None:
    blocker = tmp_path / ".state.json.tmp"
    blocker.mkdir()
    writer = AtomicWriter(tmp_path / "state.json")
    results = await asyncio.gather(writer.write("a"), writer.write("b"), return_exceptions=True)
    assert all(isinstance(r, IsADirectoryError) for r in results), results
    blocker.rmdir()
    await writer.write("c")
    assert (tmp_path / "state.json").read_text() == "c"


async def test_a_cancelled_caller_does_not_cancel_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowWrites(monkeypatch, seconds=5)
    writer = AtomicWriter(tmp_path / "state.json")
    caller = asyncio.create_task(writer.write("kept"))
    await eventually(lambda: slow.concurrent == 1, 5, "the write to start")
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    slow.release.set()
    await writer.write("kept")  # queued behind the first; returns once both are durable
    assert slow.texts == ["kept", "kept"]
    assert (tmp_path / "state.json").read_text() == "kept"
