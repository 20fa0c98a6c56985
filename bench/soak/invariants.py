"""The invariants checked every `--check-interval` seconds while the soak runs, and at rest at the end.

Status (each model once, slots, READY within slots), every READY backend's
pid alive and `/health` 200, no backend outside Status for long, never more
live backends of a type than its slots (sampled every 0.1 s), Watch keeps
delivering, every backend the chaos task killed reported; at rest: nothing
in flight, the live backends are Status's, pins.json holds the pinned
models. Also the server's RSS, descriptors and threads under load (the
trend).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter

import aiohttp
import psutil

from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2_grpc
from lemonade_grpc.testing import ServerProcess
from soak.chaos import HANG_NOTICE_SECONDS, KILL_NOTICE_SECONDS, Chaos
from soak.monitor import Monitor
from soak.processes import Resources, live_backends, resources
from soak.record import Record
from soak.server import SLOT_TYPE, SLOTS, TYPE_OF

# How long a backend may live outside Status (a start in flight, a crashed one being killed).
STRAY_SECONDS = 30.0


class Invariants:
    """The checks run every few seconds while the soak runs, and at rest at the end."""

    def __init__(
        self,
        server: ServerProcess,
        control: model_control_pb2_grpc.ModelControlAsyncStub,
        record: Record,
        monitor: Monitor,
        chaos: Chaos,
    ) -> None:
        self.server = server
        self.control = control
        self.record = record
        self.monitor = monitor
        self.chaos = chaos
        self.strays: dict[tuple[int, float], float] = {}
        self.most_live: Counter[str] = Counter()
        self.sequence_seen: tuple[float, int] | None = None
        self.trend: list[tuple[float, Resources]] = []
        self.trend_every = 30.0
        self.session: aiohttp.ClientSession | None = None

    async def status(self) -> pb.PoolStatus:
        return (await self.control.Status(pb.StatusRequest(), timeout=10)).pool

    async def sample_slots(self) -> None:
        """Live backends per type, every 0.1 s: never more than the type's slots."""
        while True:
            live = live_backends(self.server.process.pid).values()
            counts = Counter(
                TYPE_OF.get(p.model, p.model) for p in live if p.model not in ("forking", "exiting")
            )
            for kind, count in counts.items():
                self.most_live[kind] = max(self.most_live[kind], count)
                if count > SLOTS.get(kind, 0):
                    names = sorted(
                        f"{p.model} {p.pid}" for p in live if TYPE_OF.get(p.model, p.model) == kind
                    )
                    self.record.violation(f"{count} live {kind} backends ({names}), {SLOTS.get(kind)} slots")
            self.record.checks["slot sample"] += 1
            await asyncio.sleep(0.1)

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.check_once()

    async def check_once(self) -> None:
        now = time.monotonic()
        if not self.trend or now - self.trend[-1][0] >= self.trend_every:
            with contextlib.suppress(psutil.Error, OSError):
                self.trend.append((now, resources(self.server.process.pid)))
                print(f"[{self.record.elapsed()}] server under load: {self.trend[-1][1]}", flush=True)
        pool = await self.status()
        self.check_status(pool)
        await self.check_ready(pool)
        self.check_strays(pool)
        self.check_watch(pool)
        self.check_kills_reported()

    def check_status(self, pool: pb.PoolStatus) -> None:
        names = [m.name for m in pool.models]
        self.record.check("status: each model once", len(names) == len(set(names)), f"models {names}")
        for slots in pool.slots:
            kind = SLOT_TYPE.get(slots.type, "?")
            holding = [
                m
                for m in pool.models
                if SLOT_TYPE.get(m.type) == kind
                and m.state in (pb.MODEL_STATE_LOADING, pb.MODEL_STATE_READY, pb.MODEL_STATE_UNLOADING)
            ]
            ready = [m.name for m in holding if m.state == pb.MODEL_STATE_READY]
            self.record.check(
                "status: slots",
                len(holding) == slots.used <= slots.max_loaded == SLOTS[kind] and slots.pinned <= slots.used,
                f"{kind}: used {slots.used}, holding {[m.name for m in holding]}, max {slots.max_loaded},"
                f" pinned {slots.pinned}",
            )
            self.record.check(
                "status: READY within slots", len(ready) <= SLOTS[kind], f"{kind}: READY {ready}"
            )

    async def check_ready(self, pool: pb.PoolStatus) -> None:
        for model in pool.models:
            if model.state != pb.MODEL_STATE_READY or self.chaos.recently_hit(model.pid):
                continue
            problem = await self.backend_problem(model)
            if problem is None:
                self.record.checks["READY: pid alive, /health 200: passed"] += 1
                continue
            await asyncio.sleep(1.5)  # the pool's watcher may not have seen it yet
            again = next((m for m in (await self.status()).models if m.name == model.name), None)
            if again is None or again.state != pb.MODEL_STATE_READY or again.pid != model.pid:
                self.record.checks["READY: pid alive, /health 200: moved on"] += 1
                continue
            if self.chaos.recently_hit(model.pid):
                continue
            problem = await self.backend_problem(again)
            self.record.check(
                "READY: pid alive, /health 200", problem is None, f"{model.name} pid {model.pid}: {problem}"
            )

    async def backend_problem(self, model: pb.ModelStatus) -> str | None:
        try:
            if psutil.Process(model.pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                return "process is a zombie"
        except psutil.NoSuchProcess:
            return "process is gone"
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=5)
            )
        try:
            async with self.session.get(f"http://127.0.0.1:{model.port}/health") as response:
                return None if response.status == 200 else f"/health answered {response.status}"
        except (aiohttp.ClientError, TimeoutError) as error:
            return f"/health: {type(error).__name__} {error}"

    def check_strays(self, pool: pb.PoolStatus) -> None:
        in_status = {m.pid for m in pool.models if m.pid}
        now = time.monotonic()
        seen = set()
        for proc in live_backends(self.server.process.pid).values():
            if proc.pid in in_status:
                continue
            key = (proc.pid, proc.created)
            seen.add(key)
            first = self.strays.setdefault(key, now)
            self.record.check(
                "no backend outside Status",
                now - first < STRAY_SECONDS,
                f"pid {proc.pid} ({proc.model}) alive and not in Status for {now - first:.0f} s",
            )
        self.strays = {key: at for key, at in self.strays.items() if key in seen}

    def check_watch(self, pool: pb.PoolStatus) -> None:
        """The monitor has received every event Status reflected at the previous check."""
        now = time.monotonic()
        if self.sequence_seen is not None:
            then, sequence = self.sequence_seen
            if now - then >= 3.0:
                self.record.check(
                    "Watch keeps delivering",
                    self.monitor.last_sequence >= sequence,
                    f"monitor at {self.monitor.last_sequence}, Status at {sequence} {now - then:.0f} s ago",
                )
                self.sequence_seen = (now, pool.sequence)
        else:
            self.sequence_seen = (now, pool.sequence)

    def check_kills_reported(self, *, final: bool = False) -> None:
        """Each backend hit while READY has had its model_unloaded event (at the end: every one)."""
        now = time.monotonic()
        for hit in list(self.chaos.hits):
            window = HANG_NOTICE_SECONDS if hit.how == "SIGSTOP" else KILL_NOTICE_SECONDS
            if not hit.was_ready or (now - hit.at < window + 10 and not final):
                continue
            self.chaos.hits.remove(hit)
            if hit.pid in self.monitor.unloaded_pids:
                self.record.checks["hit backend reported: passed"] += 1
            elif self.monitor.resync_at > hit.at:
                self.record.checks["hit backend reported: inconclusive (monitor resynced)"] += 1
            else:
                self.record.check(
                    "hit backend reported",
                    False,
                    f"{hit.how} of {hit.model} pid {hit.pid} {now - hit.at:.0f} s ago: no model_unloaded",
                )

    async def at_rest(self, seconds: float) -> pb.PoolStatus | None:
        """Status once nothing loads, stops or awaits a restart and the live backends are Status's."""
        deadline = time.monotonic() + seconds
        while True:
            pool = await self.status()
            busy = pool.load_in_flight.model or pool.queue or pool.streams_running or pool.streams_queued
            moving = [
                m.name
                for m in pool.models
                if m.state in (pb.MODEL_STATE_LOADING, pb.MODEL_STATE_UNLOADING)
                or (m.state == pb.MODEL_STATE_FAILED and m.pinned)
            ]
            live = sorted(live_backends(self.server.process.pid))
            in_status = sorted(m.pid for m in pool.models if m.pid)
            if not busy and not moving and live == in_status:
                return pool
            if time.monotonic() > deadline:
                self.record.violation(
                    f"pool not at rest after {seconds:g} s: in flight {pool.load_in_flight.model!r},"
                    f" queue {len(pool.queue)}, streams {pool.streams_running}+{pool.streams_queued},"
                    f" moving {moving}, live {live}, Status {in_status}"
                )
                return None
            await asyncio.sleep(0.2)

    def check_pins_file(self, pool: pb.PoolStatus) -> None:
        path = self.server.state_dir / "pins.json"
        on_disk: dict[str, int] = {}
        if path.exists():
            saved = json.loads(path.read_text()).get("pinned", {})
            on_disk = {name: int(entry.get("ctx_size", 0)) for name, entry in saved.items()}
        in_status = {m.name: m.options.ctx_size for m in pool.models if m.pinned}
        self.record.check(
            "at rest: pins.json == pinned in Status", on_disk == in_status, f"{on_disk} vs {in_status}"
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
