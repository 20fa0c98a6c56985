"""The watchdog's checks of an idle backend: a read of its process state, a GET only now and then.

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
from types import SimpleNamespace
from typing import Any, cast

from conftest import eventually
from lemonade_grpc.backends.process import BackendProcess
from lemonade_grpc.core.settings import PoolSettings
from lemonade_grpc.core.tasks import TaskOwner
from lemonade_grpc.pool.model import Model, ModelState
from lemonade_grpc.pool.watchdog import Watchdog


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
