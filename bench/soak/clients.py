"""The random workload: `--clients` clients, each on its own channel, calling every RPC at random.

Load, Unload, Pin, Plan, Status, ListModels, Watch, Complete and Chat, each
call given up at random (never, at a short deadline, or by a cancel after a
random number of stream messages), its outcome counted and its reply
checked against what the RPC promises. One random generator per client,
seeded from `--seed`: a seed repeats every client's choices.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc

from lemonade_grpc._gen.lemonade.v1 import inference_pb2, inference_pb2_grpc, model_control_pb2_grpc
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from soak.monitor import Monitor, SequenceCheck
from soak.record import PATIENT_SECONDS, Record, classify
from soak.server import MODELS

Reply = TypeVar("Reply")


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
