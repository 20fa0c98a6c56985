"""Watch streams checked as they are read: gap-free sequences, and one stream held the whole run.

`SequenceCheck` checks any Watch stream (fresh, resumed or from 0);
`Monitor` holds one open from start to end, keeps the pins and states it
reports (the clients pick models from them), records every backend
reported unloaded, and fails a pinned READY model evicted for LRU, idle or
memory.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque

import grpc

from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2_grpc
from soak.record import Record, error_reason


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
