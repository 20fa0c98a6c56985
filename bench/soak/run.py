"""The run's phases: warm-up, a quiet measurement, the main phase, another, the final checks, the shutdown.

The quiet measurements pause the clients and the chaos task, empty the
pool and read the server's resources (medians); the shutdown check sends
SIGTERM with models loaded and streams running; the server log is read for
ERROR records, tracebacks and lost exceptions.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import statistics
import time
from collections import Counter
from typing import Any

import grpc
import psutil

from lemonade_grpc._gen.lemonade.v1 import inference_pb2, inference_pb2_grpc, model_control_pb2_grpc
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.testing import ServerProcess, tagged_processes
from soak.chaos import Chaos
from soak.clients import Clients
from soak.invariants import Invariants
from soak.monitor import Monitor
from soak.processes import Resources, resources
from soak.record import Record, error_reason
from soak.report import second_half
from soak.server import SLOTS


async def quiet_resources(
    clients: Clients,
    chaos: Chaos,
    invariants: Invariants,
    control: Any,
    server: ServerProcess,
    record: Record,
) -> Resources | None:
    """Pause the workload, empty the pool, let the server idle, and read its resources (medians)."""
    chaos.running.clear()
    cut = await clients.pause(10.0)
    record.note(f"workload paused ({cut} calls still running were cancelled)")
    pool = await invariants.at_rest(45.0)
    if pool is not None:
        invariants.check_pins_file(pool)
    await control.Unload(pb.UnloadRequest(model=""), timeout=60)
    empty = await invariants.at_rest(30.0)
    if empty is None:
        return None
    record.check("emptied: no model in Status", not empty.models, f"{[m.name for m in empty.models]}")
    await asyncio.sleep(3.0)
    samples = []
    for _ in range(5):
        samples.append(resources(server.process.pid))
        await asyncio.sleep(0.5)
    return Resources(
        int(statistics.median(s.rss_bytes for s in samples)),
        int(statistics.median(s.fds for s in samples)),
        int(statistics.median(s.threads for s in samples)),
    )


async def shutdown_check(server: ServerProcess, control: Any, inference: Any, record: Record) -> None:
    """SIGTERM with models loaded (one pinned) and streams running: exit 0, nothing left behind."""
    for name, pinned in (("tiny", True), ("fa", False), ("emb", False)):
        async for _ in control.Load(pb.LoadRequest(model=name, pinned=pinned), timeout=60):
            pass
    pids = {m.pid for m in (await control.Status(pb.StatusRequest(), timeout=10)).pool.models if m.pid}
    streams = [
        inference.Complete(
            inference_pb2.CompleteRequest(model="fa", prompt="x", max_tokens=100_000), timeout=60
        )
        for _ in range(3)
    ]
    for call in streams:
        await call.read()  # each stream is running
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    endings: Counter[str] = Counter()
    for call in streams:
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
            endings["OK"] += 1
        except grpc.aio.AioRpcError as error:
            endings[f"{error.code().name}/{error_reason(error)}"] += 1
    code = await asyncio.to_thread(server.process.wait, 30)
    took = time.monotonic() - started
    record.note(f"shutdown: exit {code} after {took:.1f} s; streams ended {dict(endings)}")
    record.check("shutdown: exit status 0", code == 0, f"exit status {code}")
    record.check(
        "shutdown: running streams end SHUTTING_DOWN",
        set(endings) <= {"UNAVAILABLE/SHUTTING_DOWN", "OK"},
        f"{dict(endings)}",
    )
    for _ in range(50):  # the backends' exit may take a moment to be seen
        if not (left := tagged_processes({server.tag})):
            break
        await asyncio.sleep(0.1)
    names = [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in left]
    record.check("shutdown: no process left", not left, f"left running: {names}")
    record.check(
        "shutdown: backends gone",
        not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"],
        f"backend pids {sorted(pids)}",
    )


def check_log(server: ServerProcess, record: Record) -> None:
    """No ERROR record, traceback or lost task exception in the server's log; grouped, with counts."""
    found: Counter[str] = Counter()
    record_line = ""  # the last line that starts a log record
    for line in server.log().splitlines():
        if re.match(r"\d{4}-\d\d-\d\d ", line):
            record_line = line
        header = re.match(r"\S+ \S+ (ERROR|CRITICAL) (.*)", line)
        if header or re.search(r"never retrieved|Task was destroyed|internal error", line):
            text = header.group(2) if header else line
        elif line.startswith("Traceback") and " ERROR " not in record_line:
            text = f"a traceback after: {record_line}"
        else:
            continue
        found[re.sub(r"0x[0-9a-f]+|\d+", "N", text)[:160]] += 1
    record.check(
        "server log: no ERROR, traceback or lost exception",
        not found,
        "; ".join(f"{n} x {text}" for text, n in found.most_common(5)),
    )


async def run(
    args: argparse.Namespace, record: Record, server: ServerProcess
) -> tuple[Resources | None, Resources | None]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        control = model_control_pb2_grpc.ModelControlStub(channel)
        inference = inference_pb2_grpc.InferenceStub(channel)
        monitor = Monitor(control, record)
        chaos = Chaos(server, control, args.seed, record)
        invariants = Invariants(server, control, record, monitor, chaos)
        invariants.trend_every = args.trend_every
        clients = Clients(server.address, args.clients, args.seed, record, monitor)
        background: list[asyncio.Task[None]] = [asyncio.create_task(monitor.run())]
        await asyncio.sleep(0.5)
        background += [
            asyncio.create_task(invariants.sample_slots()),
            asyncio.create_task(invariants.run(args.check_interval)),
            asyncio.create_task(chaos.run()),
        ]
        try:
            await clients.start()
            chaos.running.set()
            warmup = min(60.0, max(10.0, args.duration * 0.125))
            record.note(f"warm-up: {warmup:.0f} s, {args.clients} clients, chaos on")
            await sleep_watching(warmup, background)
            baseline = await quiet_resources(clients, chaos, invariants, control, server, record)
            record.note(f"baseline (pool empty, clients idle): {baseline}")
            clients.resume()
            chaos.running.set()
            main = args.duration - warmup
            record.note(f"main phase: {main:.0f} s")
            await sleep_watching(main, background)
            end = await quiet_resources(clients, chaos, invariants, control, server, record)
            record.note(f"end (pool empty, clients idle): {end}")
            await invariants.check_once()
            invariants.check_kills_reported(final=True)
            await clients.close()
            monitor.stop()
            check_log(server, record)
            record.note(
                f"monitor Watch: {monitor.check.messages} messages, {monitor.check.resyncs} resyncs;"
                f" events {dict(monitor.events)}"
            )
            record.note(f"unload reasons and warnings seen: {dict(monitor.reasons)}")
            for code, examples in sorted(monitor.warnings.items()):
                record.note(f"warning {code}, e.g.: " + " | ".join(examples))
            record.note(
                f"server under load, every {args.trend_every:g} s (s: RSS MiB/fds/threads): "
                + ", ".join(
                    f"{at - record.started:.0f}: {r.rss_bytes / 2**20:.1f}/{r.fds}/{r.threads}"
                    for at, r in invariants.trend
                )
            )
            record.note(second_half(invariants.trend))
            record.note(f"most live backends per type: {dict(invariants.most_live)} (slots {SLOTS})")
            await shutdown_check(server, control, inference, record)
            return baseline, end
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await invariants.close()


async def sleep_watching(seconds: float, background: list[asyncio.Task[None]]) -> None:
    """Sleep, but fail at once when a background task (monitor, checks, chaos) died of an exception."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(min(1.0, deadline - time.monotonic()))
        for task in background:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"a soak task failed: {task.exception()!r}") from task.exception()
