"""Soak: a real server under 50 random clients and a chaos task, its invariants checked as it runs.

`make soak` (not part of `make test`; bounded to 10 minutes). One server
(`python -m lemonade_grpc serve`) on a catalog of the bundled tiny model run
by the real llama-server and four fake OpenAI-compatible backends
(tests/fake_backend.py, run as a file through the `command` recipe), with
fewer slots than models so that loads evict. Then, for `--duration` seconds:

- `--clients` clients, each on its own channel, call Load, Unload, Pin,
  Plan, Status, ListModels, Watch, Complete and Chat at random, giving up at
  random points: a short deadline, or a cancel after a random number of
  stream messages;
- a chaos task SIGKILLs a backend taken from Status (or one still loading)
  every few seconds, and now and then SIGSTOPs one (a hang);
- a monitor holds one Watch stream open for the whole run and checks its
  sequence numbers and the pins;
- every `--check-interval` seconds the invariants below are checked.

Invariants (each failure is printed and makes the exit status 1):

- Status: no model twice, per type at most `max_loaded` models holding a
  slot (`used` agrees), pinned <= used;
- every READY model's pid is alive and its port answers `GET /health` 200
  (re-checked once a moment later, and not for a pid the chaos task just
  hit, before counting as a failure);
- no backend process the server started is missing from Status for long
  (the server's descendants read from /proc, against Status's pids), and
  never more live backends of a type than its slots (sampled every 0.1 s);
- every failed RPC has a known (code, ErrorInfo reason) pair of docs/api.md
  and a reason a valid request can get; never INTERNAL or UNKNOWN; a stream
  that ends OK ends as its RPC promises (READY, a finish reason);
- Watch: gap-free sequence numbers on every stream (resumed ones too), the
  long-lived stream keeps delivering, a pinned READY model is never evicted
  (LRU, idle, memory), every backend the chaos task killed is reported;
- at rest at the end: no load in flight, the live backends are Status's,
  pins.json holds the pinned models;
- resources: the server's RSS, file descriptors and threads with the pool
  empty and clients idle, after the warm-up and at the end: RSS growth under
  10 %, descriptors and threads back to the baseline (small slack). The
  server exposes no asyncio task count: threads are what can be measured
  from outside;
- shutdown: SIGTERM with models loaded and streams running exits 0 and no
  process carrying the run's tag is left; no ERROR record or traceback in
  the server log.

Prints a summary (operations by kind and outcome, kills, checks) and writes
it to bench/results/soak-<date>.txt. Usage:
`python bench/soak.py [--duration S] [--clients N] [--seed N]`.

The server's RSS is sampled every `--trend-every` seconds under load
(printed as it is read, and in the summary with the change over the run's
second half). `--unbounded` lifts the 10-minute bound for an investigative
run (issue 18 finding 15: eight minutes could not tell an allocator
settling from a slow leak); `make soak` never passes it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import grpc
import psutil
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from lemonade_grpc._gen.lemonade.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    model_control_pb2_grpc,
)
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.provision.tiny_model import ensure_tiny_model
from lemonade_grpc.testing import (
    ServerDidNotStart,
    ServerProcess,
    cpu_model,
    launch,
    serve_command,
    tagged_processes,
)

ROOT = Path(__file__).resolve().parent.parent
FAKE_BACKEND = ROOT / "tests" / "fake_backend.py"
RESULTS = Path(__file__).resolve().parent / "results"
DOMAIN = "lemonade.v1"
# The whole run, start to exit, must end within this (issue 13: 10 minutes).
BUDGET_SECONDS = 600.0
# Startup, two quiet measurements, the final checks and the shutdown: at most this much.
OVERHEAD_SECONDS = 110.0

# Slots per type, and the models competing for them.
SLOTS = {"llm": 2, "embedding": 1}
FAKES = {
    # name: (type, extra fake_backend flags)
    "fa": ("llm", ["--load-seconds", "0.2", "--token-seconds", "0.01"]),
    "fb": ("llm", ["--load-seconds", "0.5", "--token-seconds", "0.02"]),
    "fc": ("llm", ["--load-seconds", "1.0", "--token-seconds", "0.005"]),
    "emb": ("embedding", ["--load-seconds", "0.2", "--token-seconds", "0.01"]),
}
MODELS = ("tiny", *FAKES)
TYPE_OF = {"tiny": "llm"} | {name: kind for name, (kind, _) in FAKES.items()}
SLOT_TYPE = {pb.MODEL_TYPE_LLM: "llm", pb.MODEL_TYPE_EMBEDDING: "embedding"}

CONFIG = """\
[server]
shutdown_grace_seconds = 2

[pool]
max_loaded = {{ llm = {llm}, embedding = {embedding} }}
idle_unload_seconds = 0
evict_grace_seconds = 1
stop_grace_seconds = 1
health_timeout_seconds = 15
health_check_seconds = 1
health_check_timeout_seconds = 2
health_check_failures = 3
restart_backoff_seconds = 0.5
restart_backoff_max_seconds = 4
max_restarts = 10
restart_window_seconds = 60
memory_check_seconds = 1
memory_reserve_mb = {reserve}

[limits]
max_streams = 24
max_streams_per_model = 8
max_queued_streams = 16
max_queued_loads = 16
watch_queue_events = 128
max_watch_streams = 64
"""

# Every (code, reason) pair docs/api.md lists; those a valid request of this soak may get.
KNOWN = {
    (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
    (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OPTIONS"),
    (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST"),
    (grpc.StatusCode.INVALID_ARGUMENT, "BACKEND_REJECTED"),
    (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
    (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_LOADED"),
    (grpc.StatusCode.FAILED_PRECONDITION, "SLOTS_PINNED"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_MEMORY"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_RESOURCES_EXHAUSTED"),
    (grpc.StatusCode.ABORTED, "LOAD_CANCELLED"),
    (grpc.StatusCode.ABORTED, "MODEL_EVICTED"),
    (grpc.StatusCode.ABORTED, "SHUTTING_DOWN"),
    (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"),
    (grpc.StatusCode.UNAVAILABLE, "BACKEND_START_FAILED"),
    (grpc.StatusCode.UNAVAILABLE, "BACKEND_CRASHED"),
    (grpc.StatusCode.UNAVAILABLE, "BACKEND_ERROR"),
    (grpc.StatusCode.UNAVAILABLE, "STATE_WRITE_FAILED"),
    (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    (grpc.StatusCode.INTERNAL, "INTERNAL_ERROR"),
}
# Reasons a well-formed request to this server can meet while the pool churns and backends die.
EXPECTED = {
    "MODEL_NOT_LOADED",
    "SLOTS_PINNED",
    "OVERLOADED",
    "LOAD_CANCELLED",
    "MODEL_EVICTED",
    "BACKEND_START_FAILED",
    "BACKEND_CRASHED",
    "BACKEND_ERROR",
}
# With --memory-headroom-mb the reserve bites: loads may not fit.
MEMORY_REASONS = {"INSUFFICIENT_MEMORY"}
# Client-side endings: no ErrorInfo to expect.
CLIENT_CODES = {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
# A call given this long (no client-side giving up meant) that has not ended is a hang.
PATIENT_SECONDS = 120.0
# How long after the chaos task hits a backend a READY status for it is not yet a failure.
KILL_NOTICE_SECONDS = 6.0
HANG_NOTICE_SECONDS = 20.0
# How long a backend may live outside Status (a start in flight, a crashed one being killed).
STRAY_SECONDS = 30.0
# Resources with the pool empty, end vs baseline.
RSS_GROWTH_LIMIT = 0.10
FD_SLACK = 4
THREAD_SLACK = 2

Reply = TypeVar("Reply")


# ------------------------------------------------------------------ records


@dataclasses.dataclass
class Record:
    """Everything the run counts and every violation it finds."""

    started: float = dataclasses.field(default_factory=time.monotonic)
    outcomes: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)
    violations: list[str] = dataclasses.field(default_factory=list)
    kills: Counter[str] = dataclasses.field(default_factory=Counter)
    checks: Counter[str] = dataclasses.field(default_factory=Counter)
    notes: list[str] = dataclasses.field(default_factory=list)
    memory_reasons: bool = False
    # The first message of each error outcome, for the summary.
    examples: dict[str, str] = dataclasses.field(default_factory=dict)

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.started:7.1f}s"

    def violation(self, text: str) -> None:
        line = f"[{self.elapsed()}] {text}"
        self.violations.append(line)
        print(f"VIOLATION {line}", flush=True)

    def note(self, text: str) -> None:
        line = f"[{self.elapsed()}] {text}"
        self.notes.append(line)
        print(line, flush=True)

    def check(self, name: str, ok: bool, failure: str) -> None:
        self.checks[f"{name}: {'passed' if ok else 'failed'}"] += 1
        if not ok:
            self.violation(f"{name}: {failure}")


def error_reason(error: grpc.aio.AioRpcError) -> str | None:
    """The ErrorInfo reason in the trailers of `error`, None when there is none."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # typed for sync calls, works for aio
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and detail.Unpack(info):
            return info.reason if info.domain == DOMAIN else f"(domain {info.domain!r}) {info.reason}"
    return None


def classify(error: grpc.aio.AioRpcError, record: Record, what: str, patient: bool) -> str:
    """The outcome name of a failed call; a violation when the error breaks the contract."""
    code = error.code()
    if code in CLIENT_CODES:
        if patient and code is grpc.StatusCode.DEADLINE_EXCEEDED:
            record.violation(f"{what}: no end within {PATIENT_SECONDS:g} s (a hang)")
        return code.name
    reason = error_reason(error)
    outcome = f"{code.name}/{reason}"
    message = (error.details() or "")[:200]
    record.examples.setdefault(outcome, f"{what}: {message}")
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        record.violation(f"{what}: {outcome}: {message}")
    elif reason is None:
        record.violation(f"{what}: {code.name} without an ErrorInfo: {message}")
    elif (code, reason) not in KNOWN:
        record.violation(f"{what}: {outcome} is not a (code, reason) pair of docs/api.md: {message}")
    elif reason not in EXPECTED and not (record.memory_reasons and reason in MEMORY_REASONS):
        record.violation(f"{what}: {outcome} for a valid request: {message}")
    return outcome


# ------------------------------------------------------------------ processes


@dataclasses.dataclass(frozen=True)
class Proc:
    pid: int
    created: float
    model: str


def model_of(process: psutil.Process) -> str:
    """Which catalog model a backend process runs, from its command line.

    "forking": a child between fork and exec still has the server's command line.
    """
    try:
        command = process.cmdline()
    except psutil.NoSuchProcess:  # gone (or a zombie) since the children were listed
        return "exiting"
    except psutil.Error:
        return "?"
    if not command:
        return "exiting"  # its memory is already released: a dying process
    if "--" in command and command[0].endswith("setpriv"):
        command = command[command.index("--") + 1 :]
    server = "lemonade_grpc" in command or any(part.endswith("traced_server.py") for part in command)
    if server and "serve" in command:
        return "forking"  # a copy of the server, between fork and exec
    if "--model" in command:
        stem = Path(command[command.index("--model") + 1]).stem
        return stem if stem in FAKES else "tiny"
    if any("llama-server" in part for part in command):
        return "tiny"
    return f"? {' '.join(command)[:80]}"


def live_backends(server_pid: int) -> dict[int, Proc]:
    """The server's live (not zombie) descendants."""
    found: dict[int, Proc] = {}
    try:
        children = psutil.Process(server_pid).children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            if child.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                continue
            found[child.pid] = Proc(child.pid, child.create_time(), model_of(child))
        except psutil.Error:
            continue
    return found


@dataclasses.dataclass(frozen=True)
class Resources:
    rss_bytes: int
    fds: int
    threads: int

    def __str__(self) -> str:
        return f"RSS {self.rss_bytes / 2**20:.1f} MiB, {self.fds} fds, {self.threads} threads"


def resources(pid: int) -> Resources:
    process = psutil.Process(pid)
    return Resources(process.memory_info().rss, len(os.listdir(f"/proc/{pid}/fd")), process.num_threads())


# ------------------------------------------------------------------ server


def write_config(workdir: Path, tiny: Path, memory_headroom_mb: int | None) -> Path:
    reserve = 0
    if memory_headroom_mb is not None:
        reserve = max(0, (psutil.virtual_memory().available >> 20) - memory_headroom_mb)
    text = CONFIG.format(llm=SLOTS["llm"], embedding=SLOTS["embedding"], reserve=reserve)
    text += (
        f'\n[models.tiny]\nrecipe = "llamacpp"\npath = "{tiny}"\nctx_size = 256\nargs = ["--threads", "1"]\n'
    )
    for name, (kind, flags) in FAKES.items():
        model_file = workdir / f"{name}.bin"  # the fake only checks that it exists; its name says which
        model_file.write_bytes(b"fake model\n")
        command = [sys.executable, str(FAKE_BACKEND), "--port", "{port}", "--model", "{path}", *flags]
        text += (
            f'\n[models.{name}]\nrecipe = "command"\npath = "{model_file}"\ntype = "{kind}"\n'
            f"ctx_size = 256\ncommand = {json.dumps(command)}\n"
        )
    path = workdir / "soak.toml"
    path.write_text(text)
    return path


def start_server(workdir: Path, config: Path, traced: Path | None = None) -> ServerProcess:
    """The server under test; with `traced`, under `traced_server.py` (tracemalloc snapshots there)."""
    state_dir = workdir / "state"
    python = (
        (sys.executable, "-m", "lemonade_grpc")
        if traced is None
        else (sys.executable, str(Path(__file__).with_name("traced_server.py")), str(traced))
    )
    command = serve_command(state_dir, "--config", str(config), python=python)
    try:
        return launch(command, workdir / "server.log", state_dir, cwd=ROOT)
    except ServerDidNotStart as error:
        raise SystemExit(str(error)) from None


# ------------------------------------------------------------------ Watch


class SequenceCheck:
    """One Watch stream's messages: a gap-free sequence, snapshots only where allowed."""

    def __init__(self, what: str, record: Record, since: int | None) -> None:
        self.what = what
        self.record = record
        self.since = since
        self.last: int | None = None
        self.messages = 0
        self.resyncs = 0
        self.ok = True

    def see(self, message: pb.WatchResponse) -> None:
        kind = message.WhichOneof("event")
        first = self.messages == 0
        self.messages += 1
        if kind == "snapshot":
            if message.resync:
                self.resyncs += 1
                if self.last is not None and message.sequence < self.last:
                    self.fail(f"resync snapshot at {message.sequence}, behind {self.last}")
            elif not (first and self.since is None):
                self.fail(f"a snapshot without resync at {message.sequence}, message {self.messages}")
            self.last = message.sequence
            return
        if first and self.since is None:
            self.fail(f"first message is {kind}, not a snapshot")
        expected = self.last + 1 if self.last is not None else None
        if expected is None and self.since is not None and self.since > 0:
            expected = self.since + 1
        if expected is not None and message.sequence != expected:
            self.fail(f"{kind} numbered {message.sequence}, expected {expected}")
        self.last = message.sequence

    def fail(self, text: str) -> None:
        if self.ok:  # one violation per stream: the rest follows from the first
            self.record.violation(f"{self.what}: {text}")
        self.ok = False


class Monitor:
    """One Watch stream held open the whole run: sequence, pins, crash reports."""

    def __init__(self, control: model_control_pb2_grpc.ModelControlAsyncStub, record: Record) -> None:
        self.control = control
        self.record = record
        self.check = SequenceCheck("monitor Watch", record, None)
        self.pinned: dict[str, bool] = {}
        self.state: dict[str, int] = {}
        self.unloaded_pids: dict[int, float] = {}
        self.events: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.resync_at = 0.0
        # (sequence, model, kind, pinned) of each event naming a model, for `overridden`.
        self.history: deque[tuple[int, str, str, bool]] = deque(maxlen=50_000)
        self.warnings: dict[str, list[str]] = {}
        self.call: grpc.aio.UnaryStreamCall[pb.WatchRequest, pb.WatchResponse] | None = None
        self.ending = False

    @property
    def last_sequence(self) -> int:
        return self.check.last or 0

    async def run(self) -> None:
        self.call = self.control.Watch(pb.WatchRequest())
        try:
            async for message in self.call:
                self.check.see(message)
                self.apply(message)
        except grpc.aio.AioRpcError as error:
            if not self.ending:
                self.record.violation(f"monitor Watch ended: {error.code().name} {error_reason(error)}")
            return
        if not self.ending:
            self.record.violation("monitor Watch ended OK in the middle of the run")

    def stop(self) -> None:
        self.ending = True
        if self.call is not None:
            self.call.cancel()

    async def overridden(self, model: str, since: int, pinned: bool | None) -> bool:
        """Whether an event of `model` after sequence `since` explains a reply not showing a change.

        A Pin (or a pinned Load) answers once the pin file is written; a
        concurrent Pin, pinned Load or Unload of the same model may change
        it meanwhile, and the reply shows the model as it is by then.
        """
        await asyncio.sleep(1.0)  # what happened meanwhile reaches the monitor
        if self.resync_at and self.resync_at > time.monotonic() - 60:
            return True  # events may have been missed: cannot tell
        for sequence, name, kind, value in self.history:
            if sequence <= since or name != model:
                continue
            if kind in ("model_state_changed", "model_unloaded"):
                return True
            if kind == "pin_changed" and pinned is not None and value != pinned:
                return True
        return False

    def apply(self, message: pb.WatchResponse) -> None:
        kind = message.WhichOneof("event") or "?"
        self.events[kind] += 1
        named = {
            "model_loaded": (message.model_loaded.status.name, message.model_loaded.status.pinned),
            "pin_changed": (message.pin_changed.model, message.pin_changed.pinned),
            "model_state_changed": (message.model_state_changed.model, False),
            "model_unloaded": (message.model_unloaded.model, False),
        }.get(kind)
        if named is not None:
            self.history.append((message.sequence, named[0], kind, named[1]))
        if kind == "snapshot":
            if message.resync:
                self.resync_at = time.monotonic()
            self.pinned = {m.name: m.pinned for m in message.snapshot.models}
            self.state = {m.name: m.state for m in message.snapshot.models}
        elif kind == "model_loaded":
            status = message.model_loaded.status
            self.pinned[status.name] = status.pinned
            self.state[status.name] = pb.MODEL_STATE_READY
        elif kind == "pin_changed":
            self.pinned[message.pin_changed.model] = message.pin_changed.pinned
        elif kind == "model_state_changed":
            changed = message.model_state_changed
            self.evicted_pinned(changed.model, changed.reason, "UNLOADING")
            self.state[changed.model] = changed.state
        elif kind == "model_unloaded":
            unloaded = message.model_unloaded
            self.reasons[pb.UnloadReason.Name(unloaded.reason)] += 1
            self.evicted_pinned(unloaded.model, unloaded.reason, "unloaded")
            self.unloaded_pids[unloaded.pid] = time.monotonic()
            if unloaded.reason == pb.UNLOAD_REASON_CRASHED:
                self.state[unloaded.model] = pb.MODEL_STATE_FAILED
            else:
                self.state.pop(unloaded.model, None)
                self.pinned.pop(unloaded.model, None)
        elif kind == "warning":
            self.reasons[f"warning {message.warning.code}"] += 1
            examples = self.warnings.setdefault(message.warning.code, [])
            if len(examples) < 3:
                examples.append(message.warning.message[:200])

    def evicted_pinned(self, model: str, reason: pb.UnloadReason.ValueType, what: str) -> None:
        automatic = (pb.UNLOAD_REASON_EVICTED_LRU, pb.UNLOAD_REASON_IDLE, pb.UNLOAD_REASON_MEMORY_PRESSURE)
        if reason in automatic and self.pinned.get(model) and self.state.get(model) == pb.MODEL_STATE_READY:
            why = pb.UnloadReason.Name(reason)
            self.record.violation(f"pinned READY model {model} {what} for {why}")


# ------------------------------------------------------------------ clients


class Clients:
    """The random workload: each client a loop of random calls, each call given up at random."""

    def __init__(self, address: str, count: int, seed: int, record: Record, monitor: Monitor) -> None:
        self.address = address
        self.record = record
        self.monitor = monitor
        self.rngs = [random.Random(seed * 1_000_003 + index) for index in range(count)]
        self.channels: list[grpc.aio.Channel] = []
        self.gate = asyncio.Event()
        self.ops: set[asyncio.Task[None]] = set()
        self.loops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for _ in self.rngs:
            channel = grpc.aio.insecure_channel(self.address)
            await channel.channel_ready()
            self.channels.append(channel)
        self.gate.set()
        self.loops = [
            asyncio.create_task(self.client(rng, channel))
            for rng, channel in zip(self.rngs, self.channels, strict=True)
        ]

    async def pause(self, seconds: float) -> int:
        """Stop starting calls; wait `seconds` for those running, then cancel them (how many)."""
        self.gate.clear()
        if self.ops and seconds > 0:
            await asyncio.wait(set(self.ops), timeout=seconds)
        running = set(self.ops)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
        return len(running)

    def resume(self) -> None:
        self.gate.set()

    async def close(self) -> None:
        await self.pause(0)
        for task in self.loops:
            task.cancel()
        await asyncio.gather(*self.loops, return_exceptions=True)
        for channel in self.channels:
            await channel.close()

    async def client(self, rng: random.Random, channel: grpc.aio.Channel) -> None:
        control = model_control_pb2_grpc.ModelControlStub(channel)
        inference = inference_pb2_grpc.InferenceStub(channel)
        while True:
            await self.gate.wait()
            task = asyncio.create_task(self.one(rng, control, inference))
            self.ops.add(task)
            task.add_done_callback(self.ops.discard)
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(rng.uniform(0.05, 0.8))

    async def one(
        self,
        rng: random.Random,
        control: model_control_pb2_grpc.ModelControlAsyncStub,
        inference: inference_pb2_grpc.InferenceAsyncStub,
    ) -> None:
        kind = rng.choices(
            ["load", "unload", "pin", "plan", "status", "list", "watch", "complete", "chat"],
            weights=[18, 3, 7, 5, 5, 2, 5, 30, 22],
        )[0]
        model = rng.choice(MODELS)
        ready = [name for name, state in self.monitor.state.items() if state == pb.MODEL_STATE_READY]
        if kind in ("pin", "unload") and ready and rng.random() < 0.7:
            model = rng.choice(sorted(ready))
        # How the client gives up: never (a patient deadline), at a short deadline, or by cancelling.
        mode = rng.choices(["patient", "deadline", "cancel"], weights=[60, 20, 20])[0]
        limit = PATIENT_SECONDS if mode == "patient" else rng.uniform(0.02, 4.0)
        what = f"{kind} {model} ({mode}{'' if mode == 'patient' else f' {limit:.2f}s'})"
        try:
            if kind == "load":
                outcome = await self.load(rng, control, model, mode, limit, what)
            elif kind == "watch":
                outcome = await self.watch(rng, control, what)
            elif kind in ("complete", "chat"):
                outcome = await self.generate(rng, inference, kind, model, mode, limit, what)
            else:
                outcome = await self.unary(rng, control, kind, model, mode, limit, what)
        except grpc.aio.AioRpcError as error:
            outcome = classify(error, self.record, what, patient=mode == "patient")
        self.record.outcomes[(kind, outcome)] += 1

    async def give_up(self, rng: random.Random, mode: str, call: Awaitable[Reply]) -> Reply | None:
        """Await a unary call; in "cancel" mode cancel it after a random moment (None then)."""
        if mode != "cancel":
            return await call
        try:
            return await asyncio.wait_for(call, rng.uniform(0.001, 0.5))
        except TimeoutError:
            return None

    async def unary(
        self,
        rng: random.Random,
        control: model_control_pb2_grpc.ModelControlAsyncStub,
        kind: str,
        model: str,
        mode: str,
        limit: float,
        what: str,
    ) -> str:
        if kind == "unload":
            target = "" if rng.random() < 0.03 else model
            unloaded = await self.give_up(
                rng, mode, control.Unload(pb.UnloadRequest(model=target), timeout=limit)
            )
            return "cancelled" if unloaded is None else "ok"
        if kind == "pin":
            pinned = rng.random() < 0.4
            since = self.monitor.last_sequence
            reply = await self.give_up(
                rng, mode, control.Pin(pb.PinRequest(model=model, pinned=pinned), timeout=limit)
            )
            if reply is None:
                return "cancelled"
            if reply.status.name != model:
                self.record.violation(f"{what}: Pin answered the status of {reply.status.name}")
            if reply.status.pinned != pinned or reply.status.state != pb.MODEL_STATE_READY:
                if await self.monitor.overridden(model, since, pinned):
                    return "ok/overridden"
                self.record.violation(
                    f"{what}: Pin({pinned}) answered pinned={reply.status.pinned},"
                    f" state {pb.ModelState.Name(reply.status.state)}, and no event explains it"
                )
            return "ok"
        if kind == "plan":
            request = pb.PlanRequest(model=model, **load_fields(rng, model))  # type: ignore[arg-type]
            plan = await self.give_up(rng, mode, control.Plan(request, timeout=limit))
            if plan is None:
                return "cancelled"
            if plan.outcome == pb.PLAN_OUTCOME_UNSPECIFIED:
                self.record.violation(f"{what}: Plan answered no outcome")
            return f"ok/{pb.PlanOutcome.Name(plan.outcome).removeprefix('PLAN_OUTCOME_')}"
        if kind == "status":
            status = await self.give_up(rng, mode, control.Status(pb.StatusRequest(), timeout=limit))
            return "cancelled" if status is None else "ok"
        listed = await self.give_up(rng, mode, control.ListModels(pb.ListModelsRequest(), timeout=limit))
        if listed is not None and sorted(m.name for m in listed.models) != sorted(MODELS):
            self.record.violation(f"{what}: ListModels lists {[m.name for m in listed.models]}")
        return "cancelled" if listed is None else "ok"

    async def load(
        self,
        rng: random.Random,
        control: model_control_pb2_grpc.ModelControlAsyncStub,
        model: str,
        mode: str,
        limit: float,
        what: str,
    ) -> str:
        fields = load_fields(rng, model)
        since = self.monitor.last_sequence
        call = control.Load(pb.LoadRequest(model=model, **fields), timeout=limit)  # type: ignore[arg-type]
        messages: list[pb.LoadResponse] = []
        cut = await read_stream(rng, call, mode, messages)
        if cut:
            return "cancelled"
        phases = [m.phase for m in messages]
        last = messages[-1] if messages else None
        if last is None or last.phase != pb.LOAD_PHASE_READY:
            self.record.violation(f"{what}: Load ended OK without READY (phases {phases})")
            return "ok-without-ready"
        if phases != sorted(phases):
            self.record.violation(f"{what}: Load phases went backwards: {phases}")
        if any(not (m.fraction <= 1.0) for m in messages):
            self.record.violation(f"{what}: Load fraction above 1: {[m.fraction for m in messages]}")
        status = last.status
        if status.name != model:
            self.record.violation(f"{what}: READY message with the status of {status.name}")
        pinned = fields.get("pinned")
        wrong_pin = isinstance(pinned, bool) and status.pinned != pinned
        if status.state != pb.MODEL_STATE_READY or status.pid == 0 or wrong_pin:
            if await self.monitor.overridden(model, since, pinned if isinstance(pinned, bool) else None):
                return "ok/overridden"
            self.record.violation(
                f"{what}: READY message with state {pb.ModelState.Name(status.state)}, pid {status.pid},"
                f" pinned {status.pinned} (asked {pinned}), and no event explains it"
            )
        return "ok/already" if last.already_loaded else "ok"

    async def generate(
        self,
        rng: random.Random,
        inference: inference_pb2_grpc.InferenceAsyncStub,
        kind: str,
        model: str,
        mode: str,
        limit: float,
        what: str,
    ) -> str:
        tokens = rng.randint(1, 48)
        call: grpc.aio.UnaryStreamCall[Any, Any]
        if kind == "complete":
            request = inference_pb2.CompleteRequest(model=model, prompt="Once upon a time", max_tokens=tokens)
            call = inference.Complete(request, timeout=limit)
        else:
            message = inference_pb2.ChatMessage(role="user", content="Tell me a story")
            call = inference.Chat(
                inference_pb2.ChatRequest(model=model, messages=[message], max_tokens=tokens), timeout=limit
            )
        messages: list[Any] = []
        if await read_stream(rng, call, mode, messages):
            return "cancelled"
        if not messages or not messages[-1].finish_reason:
            self.record.violation(
                f"{what}: stream ended OK without a finish reason ({len(messages)} messages)"
            )
        return "ok"

    async def watch(
        self, rng: random.Random, control: model_control_pb2_grpc.ModelControlAsyncStub, what: str
    ) -> str:
        """A short-lived subscriber: fresh, resuming from a recent sequence, or from 0; slow or not."""
        start = rng.choices(["fresh", "resume", "zero"], weights=[5, 4, 1])[0]
        since: int | None = None
        if start == "resume" and self.monitor.last_sequence:
            since = max(1, self.monitor.last_sequence - rng.randint(0, 50))
        elif start == "zero":
            since = 0
        request = pb.WatchRequest() if since is None else pb.WatchRequest(since_sequence=since)
        check = SequenceCheck(f"{what} since={since}", self.record, since)
        call = control.Watch(request)
        slow = rng.random() < 0.2
        until = time.monotonic() + rng.uniform(0.2, 6.0)
        try:
            while time.monotonic() < until:
                message = await asyncio.wait_for(call.read(), max(0.01, until - time.monotonic()))
                if not isinstance(message, pb.WatchResponse):
                    self.record.violation(f"{what}: Watch ended OK")
                    return "ended"
                check.see(message)
                if slow:
                    await asyncio.sleep(rng.uniform(0.05, 0.3))
        except TimeoutError:
            pass
        finally:
            call.cancel()
        return f"ok/{start}{'/slow' if slow else ''}{'/resync' if check.resyncs else ''}"


def load_fields(rng: random.Random, model: str) -> dict[str, object]:
    """Random Load (or Plan) fields: a context size or none, an idle timeout or none, a pin or none."""
    fields: dict[str, object] = {}
    options: dict[str, Any] = {}
    if rng.random() < 0.5:
        options["ctx_size"] = rng.choice([256, 512])
    if rng.random() < 0.3:
        options["idle_unload_seconds"] = rng.choice([0, 2, 5])
    if options:
        fields["options"] = pb.LoadOptions(**options)
    if rng.random() < 0.35:
        fields["pinned"] = rng.random() < 0.4
    return fields


async def read_stream(
    rng: random.Random, call: grpc.aio.UnaryStreamCall[Any, Reply], mode: str, into: list[Reply]
) -> bool:
    """Read `call` to its end into `into`; in "cancel" mode cancel it at a random point (True then)."""
    cancel_after = rng.randint(0, 6) if mode == "cancel" else -1
    if cancel_after == 0:
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        call.cancel()
        return True
    async for message in call:
        into.append(message)
        if len(into) == cancel_after:
            call.cancel()
            return True
    return False


# ------------------------------------------------------------------ chaos


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


# ------------------------------------------------------------------ invariants


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


# ------------------------------------------------------------------ the run


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


async def soak(
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


def second_half(trend: list[tuple[float, Resources]]) -> str:
    """RSS over the second half of the samples under load: first, last, lowest, highest, rate."""
    half = trend[len(trend) // 2 :]
    if len(half) < 2:
        return "RSS over the second half: too few samples"
    (start, first), (end, last) = half[0], half[-1]
    mib = [r.rss_bytes / 2**20 for _, r in half]
    rate = (last.rss_bytes - first.rss_bytes) / 2**20 / max(1e-9, (end - start) / 60)
    return (
        f"RSS over the second half ({len(half)} samples, {(end - start) / 60:.1f} min):"
        f" {mib[0]:.1f} -> {mib[-1]:.1f} MiB, range {min(mib):.1f}-{max(mib):.1f}, {rate:+.3f} MiB/min"
    )


def compare(baseline: Resources | None, end: Resources | None, record: Record) -> list[str]:
    if baseline is None or end is None:
        record.violation("resources not measured (the pool never came to rest)")
        return []
    growth = (end.rss_bytes - baseline.rss_bytes) / baseline.rss_bytes
    record.check(
        f"resources: RSS growth < {RSS_GROWTH_LIMIT:.0%}",
        growth < RSS_GROWTH_LIMIT,
        f"RSS {baseline.rss_bytes / 2**20:.1f} -> {end.rss_bytes / 2**20:.1f} MiB ({growth:+.1%})",
    )
    record.check(
        f"resources: fds back to baseline ± {FD_SLACK}",
        abs(end.fds - baseline.fds) <= FD_SLACK,
        f"fds {baseline.fds} -> {end.fds}",
    )
    record.check(
        f"resources: threads back to baseline ± {THREAD_SLACK}",
        abs(end.threads - baseline.threads) <= THREAD_SLACK,
        f"threads {baseline.threads} -> {end.threads}",
    )
    return [
        "| | after warm-up | end | change |",
        "|---|---:|---:|---:|",
        f"| RSS | {baseline.rss_bytes / 2**20:.1f} MiB | {end.rss_bytes / 2**20:.1f} MiB | {growth:+.1%} |",
        f"| file descriptors | {baseline.fds} | {end.fds} | {end.fds - baseline.fds:+d} |",
        f"| threads | {baseline.threads} | {end.threads} | {end.threads - baseline.threads:+d} |",
    ]


def summary(args: argparse.Namespace, record: Record, table: list[str], wall: float) -> str:
    lines = [
        f"lemonade-grpc soak, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"machine: {os.cpu_count()} CPUs, {cpu_model()};"
        f" Python {platform.python_version()}, grpcio {grpc.__version__}",
        f"seed {args.seed}; {args.clients} clients; duration {args.duration:g} s; wall {wall:.0f} s",
        f"repeat: python bench/soak.py --seed {args.seed} --duration {args.duration:g}"
        f" --clients {args.clients}{' --unbounded' if args.unbounded else ''}",
        f"slots {SLOTS}; models {', '.join(f'{m} ({TYPE_OF[m]})' for m in MODELS)}",
        "",
        "operations (kind: outcome count):",
    ]
    kinds = sorted({kind for kind, _ in record.outcomes})
    total = sum(record.outcomes.values())
    for kind in kinds:
        parts = sorted(((o, n) for (k, o), n in record.outcomes.items() if k == kind), key=lambda p: -p[1])
        count = sum(n for _, n in parts)
        lines.append(f"  {kind:9} {count:6}  " + ", ".join(f"{o} {n}" for o, n in parts))
    lines.append(f"  {'total':9} {total:6}")
    lines += ["", "an example of each error (the call, the status message):"]
    lines += [f"  {outcome}: {example}" for outcome, example in sorted(record.examples.items())]
    lines += ["", "chaos: " + (", ".join(f"{k} {n}" for k, n in sorted(record.kills.items())) or "none")]
    lines += ["", "invariant checks:"]
    lines += [f"  {name} {n}" for name, n in sorted(record.checks.items()) if n]
    lines += ["", "server resources, pool empty and clients idle (medians of 5 reads):", *table]
    lines += ["", "notes:", *(f"  {note}" for note in record.notes)]
    lines += ["", f"violations: {len(record.violations)}", *(f"  {v}" for v in record.violations[:50])]
    if len(record.violations) > 50:
        lines.append(f"  ... and {len(record.violations) - 50} more")
    lines.append("RESULT: " + ("PASS" if not record.violations else "FAIL"))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=480.0, help="seconds of load (warm-up included)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None, help="random by default; printed")
    parser.add_argument("--check-interval", type=float, default=4.0)
    parser.add_argument(
        "--memory-headroom-mb",
        type=int,
        default=None,
        help="set the memory reserve this far below what is free now, so that loads evict for memory",
    )
    parser.add_argument("--output", type=Path, default=None, help="default: bench/results/soak-DATE.txt")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (server log, state)")
    parser.add_argument(
        "--trend-every", type=float, default=30.0, help="seconds between RSS samples under load (default 30)"
    )
    parser.add_argument(
        "--tracemalloc",
        type=Path,
        default=None,
        metavar="DIR",
        help="run the server under bench/traced_server.py: tracemalloc snapshots every 30 s into DIR"
        " (compare them with bench/snapshot_diff.py; RSS then includes tracemalloc's own)",
    )
    parser.add_argument(
        "--unbounded",
        action="store_true",
        help="allow a --duration beyond the 10-minute bound (an investigative run; not `make soak`)",
    )
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 2**31)
    if args.trend_every <= 0:
        parser.error("--trend-every must be positive")
    args.budget = BUDGET_SECONDS
    if args.unbounded:
        if args.duration < 10:
            parser.error("--duration must be at least 10")
        args.budget = args.duration + OVERHEAD_SECONDS + 15
    elif not 10 <= args.duration <= BUDGET_SECONDS - OVERHEAD_SECONDS:
        parser.error(
            f"--duration must be in 10..{BUDGET_SECONDS - OVERHEAD_SECONDS:g} (10 minutes in all;"
            " --unbounded for a longer investigative run)"
        )
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(f"soak: seed {args.seed}, {args.clients} clients, {args.duration:g} s", flush=True)
    record = Record(memory_reasons=args.memory_headroom_mb is not None)
    workdir = Path(tempfile.mkdtemp(prefix="lemonade-soak-"))
    config = write_config(workdir, ensure_tiny_model(), args.memory_headroom_mb)
    server = start_server(workdir, config, args.tracemalloc)
    record.note(f"server pid {server.process.pid} on {server.address}; work dir {workdir}")
    table: list[str] = []
    started = time.monotonic()
    try:
        baseline, end = asyncio.run(
            asyncio.wait_for(
                soak(args, record, server), args.budget - (time.monotonic() - record.started) - 15
            )
        )
        table = compare(baseline, end, record)
    except TimeoutError:
        record.violation(f"the soak overran its budget ({args.budget:g} s)")
    except Exception as error:  # a failure of the soak itself still reports and cleans up
        record.violation(f"the soak stopped on {type(error).__name__}: {error}")
    finally:
        leftovers = server.kill_everything()
        if leftovers:
            record.violation(f"killed at cleanup: {leftovers}")
    text = summary(args, record, table, time.monotonic() - started)
    output = args.output or RESULTS / f"soak-{datetime.date.today().isoformat()}.txt"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print()
    print(text, end="")
    print(f"(written to {output})")
    if record.violations or args.keep:
        print(f"server log and state kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if record.violations else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
