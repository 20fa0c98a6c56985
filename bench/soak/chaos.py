"""The chaos task: backends killed (and now and then frozen) at random times.

Every few seconds it SIGKILLs a READY backend taken from Status, or one
still loading; now and then it SIGSTOPs one (a hang). Its hits are what
the invariants excuse for a moment and then expect reported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import time

from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2_grpc
from lemonade_grpc.testing import ServerProcess
from soak.record import Record

# How long after the chaos task hits a backend a READY status for it is not yet a failure.
KILL_NOTICE_SECONDS = 6.0
HANG_NOTICE_SECONDS = 20.0


@dataclasses.dataclass
class Hit:
    pid: int
    model: str
    how: str
    at: float
    was_ready: bool


class Chaos:
    """Kills (and now and then freezes) backend processes at random times."""

    def __init__(
        self,
        server: ServerProcess,
        control: model_control_pb2_grpc.ModelControlAsyncStub,
        seed: int,
        record: Record,
    ) -> None:
        self.server = server
        self.control = control
        self.rng = random.Random(seed ^ 0xC4A05)
        self.record = record
        self.hits: list[Hit] = []
        self.running = asyncio.Event()

    def recently_hit(self, pid: int) -> bool:
        now = time.monotonic()
        for hit in self.hits:
            window = HANG_NOTICE_SECONDS if hit.how == "SIGSTOP" else KILL_NOTICE_SECONDS
            if hit.pid == pid and now - hit.at < window:
                return True
        return False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.rng.uniform(2.0, 7.0))
            await self.running.wait()
            choice = self.rng.random()
            if choice < 0.2 and await self.kill_a_starting_backend(3.0):
                continue
            pool = (await self.control.Status(pb.StatusRequest(), timeout=10)).pool
            ready = [m for m in pool.models if m.state == pb.MODEL_STATE_READY and m.pid]
            if not ready:
                continue
            model = self.rng.choice(ready)
            if choice < 0.4:
                self.hit(model.pid, model.name, signal.SIGSTOP, "SIGSTOP", was_ready=True)
            else:
                self.hit(model.pid, model.name, signal.SIGKILL, "SIGKILL", was_ready=True)

    async def kill_a_starting_backend(self, seconds: float) -> bool:
        """SIGKILL the process of a model still LOADING, if one shows up within `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.running.is_set():
            pool = (await self.control.Status(pb.StatusRequest(), timeout=10)).pool
            loading = [m for m in pool.models if m.state == pb.MODEL_STATE_LOADING and m.pid]
            if loading:
                target = self.rng.choice(loading)
                self.hit(target.pid, target.name, signal.SIGKILL, "SIGKILL loading", was_ready=False)
                return True
            await asyncio.sleep(0.05)
        self.record.kills["no model caught loading"] += 1
        return False

    def hit(self, pid: int, model: str, sig: signal.Signals, how: str, *, was_ready: bool) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            self.record.kills[f"{how} (already gone)"] += 1
            return
        self.hits.append(Hit(pid, model, how, time.monotonic(), was_ready))
        self.record.kills[how] += 1
