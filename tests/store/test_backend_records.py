"""Backend records: backends that outlived a crash are reaped at boot.

Odd records never stop the server, nor kill a process that is not ours (issue 9).
Fake backends write their pid to a log when they start, so "how many
processes ran" is the operating system's answer.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import (
    FAKE_BACKEND,
    ServerFactory,
    connect,
    eventually,
    fake_model,
    llama_model,
    next_message,
    pids_in,
)
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.store.backend_records import BackendRegistry
from lemonade_grpc.testing import TAG_VAR, is_gone
from over_grpc import start_on


async def test_kill_9_of_the_server_takes_its_backends_along(
    servers: ServerFactory, tiny_model: Path
) -> None:
    config = (
        "[pool]\nmax_loaded = { llm = 2 }\n" + llama_model("a", tiny_model) + llama_model("b", tiny_model)
    )
    server = servers.start(config)
    async with connect(server.address) as client:
        pids = [(await client.ready(name)).pid for name in "ab"]
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    await eventually(lambda: all(is_gone(pid) for pid in pids), 2, "every backend to die with the server")

    again = servers.start(config, state_dir=server.state_dir)
    assert "reaped 0 stale backend(s)" in again.log()


@pytest.fixture
def survivor(tiny_model: Path, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A fake backend in its own session, standing for one that outlived its control plane."""
    process = subprocess.Popen(
        [sys.executable, str(FAKE_BACKEND), "--port", "0", "--model", str(tiny_model)],
        start_new_session=True,
        env={TAG_VAR: f"survivor-{tmp_path.name}"},
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_backends_that_survived_a_crash_are_reaped_at_boot(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path, survivor: subprocess.Popen[bytes]
) -> None:
    state_dir = tmp_path / "state"
    await BackendRegistry(state_dir / "backends.json").add(survivor.pid, "ghost")
    server = servers.start(llama_model("a", tiny_model), state_dir=state_dir)
    assert survivor.wait(5) == -signal.SIGKILL
    assert "reaped stale backend of ghost" in server.log()
    async with connect(server.address) as client:
        replay = client.control.Watch(pb.WatchRequest(since_sequence=0))
        first = await next_message(replay)
        assert first.warning.code == "STALE_BACKENDS_REAPED"
        assert list(first.warning.models) == ["ghost"]
        replay.cancel()


async def test_finding_10_without_setpriv_a_backend_left_unrecorded_by_a_crash_is_reaped_at_boot(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    # Issue 18 finding 10: without setpriv (no parent-death signal), a crash of the server between a
    # backend's spawn and its record left a backend that no boot would find (4 in 30 SIGKILLs).
    no_setpriv = {"PATH": str(tmp_path / "empty-bin")}
    pid_log = tmp_path / "pids"
    config = fake_model("m", tiny_model, "--pid-log", str(pid_log), "--load-seconds", "60")
    server = servers.start(config, env=no_setpriv)
    async with connect(server.address) as client:
        load = client.control.Load(pb.LoadRequest(model="m"))
        await eventually(lambda: len(pids_in(pid_log)) == 1, 15, "the backend to be spawned")
        [pid] = pids_in(pid_log)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
        load.cancel()
    assert not is_gone(pid), "the backend died with the server: setpriv was used after all"
    # What a crash between the spawn and the record leaves: a live backend that no record names.
    (server.state_dir / "backends.json").write_text('{"backends": []}')
    again = servers.start(config, state_dir=server.state_dir, env=no_setpriv)
    await eventually(lambda: is_gone(pid), 10, f"the unrecorded backend pid {pid} to be reaped")
    assert f"reaped stale backend of m, pid {pid}, left unrecorded by a previous run" in again.log()
    assert "reaped 1 stale backend(s)" in again.log()


HOSTILE_BACKENDS = {
    "negative-pid": '{"backends": [{"pid": -1, "model": "m", "create_time": 0}]}',
    "infinite-pid": '{"backends": [{"pid": Infinity, "model": "m", "create_time": 0}]}',
    "deeply-nested": "[" * 100_000,
}


@pytest.mark.parametrize("text", HOSTILE_BACKENDS.values(), ids=HOSTILE_BACKENDS.keys())
def test_an_odd_backend_record_is_discarded_and_the_server_starts(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path, text: str
) -> None:
    """Promised (registry.py `reap_stale`): "An unreadable record is logged and discarded"."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "backends.json").write_text(text)
    status, log = start_on(servers, state_dir, fake_model("m", tiny_model))
    assert status is None, f"serve did not start on an odd backends.json:\n{log[-1500:]}"


def test_a_recorded_pid_of_an_unrelated_live_process_is_never_killed(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    """Records naming live processes that are not ours (other start time) are left alone.

    The test runner itself, an unrelated process-group leader, init, and
    records of the wrong types: the server starts, and every process lives.
    """
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        me = psutil.Process()
        records = [
            {"pid": me.pid, "model": "m", "create_time": me.create_time() + 0.01},
            {
                "pid": bystander.pid,
                "model": "m",
                "create_time": psutil.Process(bystander.pid).create_time() - 1,
            },
            {"pid": 1, "model": "m", "create_time": 0},
            {"pid": str(bystander.pid), "model": "m", "create_time": "0"},
            {"pid": [bystander.pid], "model": "m", "create_time": 0},
        ]
        state_dir = tmp_path / "state"
        state_dir.mkdir()
        (state_dir / "backends.json").write_text(json.dumps({"backends": records}))
        status, log = start_on(servers, state_dir, fake_model("m", tiny_model))
        assert status is None, log[-1500:]
        assert bystander.poll() is None, "an unrelated process was killed at boot"
        assert "reaped stale backend" not in log
    finally:
        bystander.kill()
        bystander.wait()
