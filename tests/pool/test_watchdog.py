"""The watchdog: a READY backend that exits, stops, hangs or answers 503 for good is seen; a busy one is not.

Issue 13: the GET /health every 2 s was most of an idle server's CPU time.
An idle backend is checked by reading its state in /proc (a stopped process
is still caught at once); a GET is made after a request, after a failed
check, and at least every `idle_health_check_seconds`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from conftest import (
    Events,
    ServerFactory,
    connect,
    eventually,
    fake_model,
    llama_model,
    poll,
    read_all,
    unloaded,
)
from in_process import FAKE, make_pool, shell_spec, state_of
from lemonade_grpc._gen.lemonade.v1 import inference_pb2
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.backends.process import BackendProcess
from lemonade_grpc.core.options import RequestedOptions
from lemonade_grpc.core.settings import PoolSettings
from lemonade_grpc.core.tasks import TaskOwner
from lemonade_grpc.pool.model import Model, ModelState
from lemonade_grpc.pool.pool import Pool
from lemonade_grpc.pool.watchdog import Watchdog
from lemonade_grpc.testing import is_gone
from over_grpc import WATCHDOG, eventually_async, hostile_model, model_state, ready


class CountingBackend:
    """What the watchdog reads of a backend, counting its GETs and state reads."""

    def __init__(self) -> None:
        self.gets = 0
        self.state_reads = 0
        self.is_stopped = False
        self.client = SimpleNamespace(last_activity=0.0)
        self.process = SimpleNamespace(wait=self._never_exits, stopped=self._stopped)

    async def _never_exits(self) -> int:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def _stopped(self) -> bool:
        self.state_reads += 1
        return self.is_stopped

    async def is_healthy(self, limit_seconds: float) -> bool:
        self.gets += 1
        return not self.is_stopped


async def test_an_idle_backend_is_checked_without_http_until_it_serves_a_request() -> None:
    backend = CountingBackend()
    failures: list[str] = []
    owner = TaskOwner("test")
    settings = PoolSettings(health_check_seconds=0.01, health_check_failures=3)
    watchdog = Watchdog(settings, owner, lambda model, message: failures.append(message))
    model = SimpleNamespace(name="m", state=ModelState.READY, backend=backend, leases=set())
    watchdog.watch(cast(Model, model))
    try:
        await eventually(lambda: backend.state_reads >= 10, 10, "ten idle checks")
        assert backend.gets == 0, "an idle backend was asked GET /health every check"

        backend.client.last_activity = time.monotonic()  # it served a request
        await eventually(lambda: backend.gets >= 1, 10, "a GET after a request")
        gets, reads = backend.gets, backend.state_reads
        await eventually(lambda: backend.state_reads >= reads + 5, 10, "idle again")
        assert backend.gets == gets, "GETs went on after the backend went idle again"

        model.leases.add("a request")  # in flight, waiting: a backend hung before answering must be found
        await eventually(lambda: backend.gets >= gets + 2, 10, "GETs while a request is in flight")
        model.leases.clear()
        gets, reads = backend.gets, backend.state_reads
        await eventually(lambda: backend.state_reads >= reads + 3, 10, "idle once more")
        gets = backend.gets

        backend.is_stopped = True  # a state read sees it; the checks after a failure are GETs
        await eventually(lambda: bool(failures), 10, "the stopped backend reported")
        message = failures[0]
        assert "stopped answering /health (3 checks in a row" in message
        assert backend.gets > gets
    finally:
        model.state = ModelState.UNLOADING
        await owner.close()


async def test_the_state_read_sees_a_stopped_process_and_not_a_running_one() -> None:
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(60)")
    try:
        process = cast(BackendProcess, SimpleNamespace(pid=child.pid))
        stopped = BackendProcess.stopped.__get__(process)
        assert not stopped()
        os.kill(child.pid, signal.SIGSTOP)
        await eventually(stopped, 10, "the child to show as stopped")
        os.kill(child.pid, signal.SIGCONT)
        await eventually(lambda: not stopped(), 10, "the child to run again")
    finally:
        child.kill()
        await child.wait()
    gone: Any = SimpleNamespace(pid=child.pid)
    assert not BackendProcess.stopped(gone), (
        "a process that is gone is not 'stopped' (its exit is seen elsewhere)"
    )


async def test_a_hung_llama_server_is_killed_and_restarted(servers: ServerFactory, tiny_model: Path) -> None:
    config = WATCHDOG + "health_check_seconds = 0.3\nhealth_check_failures = 2\n"
    server = servers.start(config + llama_model("tiny", tiny_model))
    async with connect(server.address) as client:
        events = Events(client.control)
        before = await client.ready("tiny", pinned=True)
        os.kill(before.pid, signal.SIGSTOP)  # alive, but answers nothing
        _, crash = await events.wait_for(unloaded("tiny", pb.UNLOAD_REASON_CRASHED), 10, "tiny seen hung")
        assert "stopped answering /health" in crash.model_unloaded.message
        after = await poll(lambda: ready(client, "tiny"), 30, "tiny to be restarted")
        events.close()
    assert is_gone(before.pid), "the hung process was left behind"
    assert after.pid != before.pid
    assert after.pinned


# ------------------------------------------------------------------------------------------ timers


async def test_a_backend_answering_503_for_good_after_ready_is_declared_hung(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    config = (
        "[pool]\nhealth_check_seconds = 0.2\nhealth_check_timeout_seconds = 0.2\nhealth_check_failures = 3\n"
        "idle_health_check_seconds = 0.4\n"
        + hostile_model("m", tmp_path, tiny_model, "--health-503-after", "1")
    )
    server = servers.start(config)
    async with connect(server.address) as client:
        ready = await client.ready("m")
        await eventually_async(lambda: model_state(client, "m"), pb.MODEL_STATE_FAILED, seconds=8)
        await eventually(lambda: is_gone(ready.pid), 5, "the hung backend to be killed")


# ------------------------------------------------------------------------------ issue 9 finding 13


async def test_a_stopped_backend_is_seen_hung_within_ten_seconds_with_the_defaults(
    servers: ServerFactory, tiny_model: Path
) -> None:
    server = servers.start(fake_model("m", tiny_model))
    async with connect(server.address) as client:
        events = Events(client.control)
        status = await client.ready("m")
        os.kill(status.pid, signal.SIGSTOP)  # alive, answering nothing
        _, crash = await events.wait_for(unloaded("m", pb.UNLOAD_REASON_CRASHED), 10, "m seen hung")
        events.close()
    assert "stopped answering /health" in crash.model_unloaded.message
    assert "Unclosed client session" not in server.log()


async def test_a_backend_too_busy_generating_to_answer_health_is_not_hung(
    servers: ServerFactory, tiny_model: Path
) -> None:
    config = (
        "[pool]\nhealth_check_seconds = 0.2\nhealth_check_timeout_seconds = 0.2\nhealth_check_failures = 2\n"
        + fake_model("m", tiny_model, "--token-seconds", "0.01", "--busy-health-seconds", "1")
    )
    server = servers.start(config)
    async with connect(server.address) as client:
        events = Events(client.control)
        before = await client.ready("m")
        # 300 tokens: about 3 s of streaming, during which /health takes 1 s
        # (5 timeouts of 0.2 s in a row at the very least).
        chunks = await read_all(
            client.inference.Complete(inference_pb2.CompleteRequest(model="m", prompt="b", max_tokens=300))
        )
        after = await client.control.Status(pb.StatusRequest())
        events.close()
    assert chunks[-1].usage.completion_tokens == 300
    assert [m.pid for m in after.pool.models] == [before.pid]
    assert not [m for m in events.messages() if m.WhichOneof("event") == "model_unloaded"]


async def test_a_backend_that_exits_is_seen_at_once_even_if_its_child_holds_the_output_pipe(
    tiny_model: Path, tmp_path: Path, pools: list[Pool]
) -> None:
    # A wrapper's helper (same process group) outlives the server, which exits on its own after 1 s.
    spec = shell_spec("sidecar", tiny_model, f"sleep 60 & exec {FAKE} --exit-after-seconds 1")
    pool = make_pool(tmp_path, {"sidecar": spec}, health_check_seconds=0)  # exits only
    pools.append(pool)
    result = await pool.load("sidecar", RequestedOptions()).outcome()
    pid = result.model.pid
    await eventually(lambda: is_gone(pid), 5, "the backend to exit")
    # Health checks are off: only the exit itself can tell the pool (was: READY for good).
    await eventually(
        lambda: state_of(pool, "sidecar") is not ModelState.READY,
        5,
        f"the pool to see that pid {pid} exited (it still says READY)",
    )
