"""Helpers for tests that drive a real server: the pool as Status shows it, saved pins, streams.

`HOSTILE_BACKEND` sends what the fake backend cannot: malformed stream events,
a body that ends without `data: [DONE]` while the process lives on, a /health
that turns 503 for good after READY (`hostile_model` runs it).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from conftest import Client, ServerFactory, fake_model, poll, read_all
from lemonade_grpc._gen.lemonade.v1 import inference_pb2
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc._gen.lemonade.v1.model_control_pb2_grpc import ModelControlStub
from lemonade_grpc.core.options import EffectiveOptions
from lemonade_grpc.store.pin_file import decode
from rpc_errors import error_info

# --- The pool as Status shows it ---------------------------------------------------------------------


async def status_of(client: Client, name: str) -> pb.ModelStatus | None:
    status = await client.control.Status(pb.StatusRequest())
    return next((m for m in status.pool.models if m.name == name), None)


async def ready(client: Client, name: str) -> pb.ModelStatus | None:
    """`name`'s status once it is READY, else None (for `poll`)."""
    model = await status_of(client, name)
    return model if model is not None and model.state == pb.MODEL_STATE_READY else None


async def states(client: Client) -> dict[str, int]:
    status = await client.control.Status(pb.StatusRequest())
    return {m.name: m.state for m in status.pool.models}


async def settled(client: Client, seconds: float = 20.0) -> dict[str, int]:
    """The models' states once none is LOADING or UNLOADING; fails after `seconds`."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        now = await states(client)
        if all(s in (pb.MODEL_STATE_READY, pb.MODEL_STATE_FAILED) for s in now.values()):
            return now
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"models still transitional after {seconds:g} s: {now}")
        await asyncio.sleep(0.02)


async def eventually_state(
    client: Client, name: str, state: pb.ModelState.ValueType, seconds: float = 10.0
) -> None:
    async def reached() -> bool | None:
        return True if (await states(client)).get(name) == state else None

    await poll(reached, seconds, f"{name} in state {pb.ModelState.Name(state)}")


async def pool_status(client: Client) -> pb.PoolStatus:
    return (await client.control.Status(pb.StatusRequest())).pool


async def model_state(client: Client, name: str) -> pb.ModelState.ValueType | None:
    for model in (await pool_status(client)).models:
        if model.name == name:
            return model.state
    return None


async def eventually_async(
    read: Callable[[], Awaitable[pb.ModelState.ValueType | None]],
    want: pb.ModelState.ValueType,
    seconds: float = 10.0,
) -> None:
    async def reached() -> bool | None:
        return True if await read() == want else None

    await poll(reached, seconds, f"state {pb.ModelState.Name(want)}")


# --- Configs -----------------------------------------------------------------------------------------

WATCHDOG = "[pool]\nmax_loaded = { llm = 2 }\nrestart_backoff_seconds = 0.2\n"


def one_slot_a_streaming_b_waiting(tmp_path: Path, tiny_model: Path, grace: float = 3.0) -> str:
    return (
        f"[pool]\nmax_loaded = {{ llm = 1 }}\nevict_grace_seconds = {grace}\n"
        + fake_model("a", tiny_model, "--token-seconds", "0.05", "--pid-log", str(tmp_path / "a.pids"))
        + fake_model("b", tiny_model, "--pid-log", str(tmp_path / "b.pids"))
    )


# --- Pins on disk, and a server started on a prepared state directory --------------------------------

PINS = "pins.json"


def saved_pins(state_dir: Path) -> dict[str, EffectiveOptions]:
    """The pins in `state_dir`'s pin file; none while there is no such file."""
    path = state_dir / PINS
    return dict(decode(path.read_text())) if path.exists() else {}


def start_on(servers: ServerFactory, state_dir: Path, config: str) -> tuple[int | None, str]:
    """Start `serve` on a prepared `state_dir`; (exit status or None while it runs, its log).

    Waits until it has begun restoring pins and then answers a Status with
    nothing loading or queued (all the boot started is done), or exits,
    whichever comes first.
    """
    try:
        server = servers.start(config, state_dir=state_dir)
    except pytest.fail.Exception as failed:
        return -1, str(failed)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.process.poll() is None:
        if "pins: restoring" in server.log():
            break
        time.sleep(0.02)
    # Issue 18 finding 12: was a sleep "for anything the boot does after the restore".
    with grpc.insecure_channel(server.address) as channel:
        control = ModelControlStub(channel)
        while time.monotonic() < deadline and server.process.poll() is None:
            try:
                pool = control.Status(pb.StatusRequest(), timeout=5).pool
            except grpc.RpcError:
                break  # it died (the caller reads its status) or cannot answer (the log says why)
            if not pool.load_in_flight.model and not pool.queue:
                break
            time.sleep(0.02)
    return server.process.poll(), server.log()


# --- Streams -----------------------------------------------------------------------------------------

Stream = grpc.aio.UnaryStreamCall[inference_pb2.CompleteRequest, inference_pb2.CompleteResponse]


def complete(client: Client, model: str, tokens: int = 8, prompt: str = "x", **kw: object) -> Stream:
    return client.inference.Complete(
        inference_pb2.CompleteRequest(model=model, prompt=prompt, max_tokens=tokens),
        **kw,  # type: ignore[arg-type]
    )


async def streams(client: Client) -> tuple[int, int]:
    pool = await pool_status(client)
    return pool.streams_running, pool.streams_queued


async def wait_streams(client: Client, want: tuple[int, int], seconds: float = 10.0) -> None:
    async def reached() -> bool | None:
        return True if await streams(client) == want else None

    await poll(reached, seconds, f"streams (running, queued) == {want}")


async def failure(call: Stream) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await read_all(call)
    return raised.value.code(), error_info(raised.value).reason


def after(sequence: int, matches: Callable[[pb.WatchResponse], bool], message: pb.WatchResponse) -> bool:
    """Whether `message` comes after event `sequence` and `matches`."""
    return message.sequence > sequence and matches(message)


# --- A backend that misbehaves on request ------------------------------------------------------------

HOSTILE_BACKEND = r"""
import argparse, asyncio, json, sys, time

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--mode", default="ok")
parser.add_argument("--health-503-after", type=float, default=-1.0)
args, _ = parser.parse_known_args()
started = time.monotonic()

def sse(event):
    return b"data: " + (event if isinstance(event, bytes) else json.dumps(event).encode()) + b"\n\n"

GOOD = {"choices": [{"text": "tok ", "index": 0, "finish_reason": None}]}
FINAL = {"choices": [{"text": "", "index": 0, "finish_reason": "length"}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 2},
         "timings": {"prompt_ms": 0.1, "predicted_per_second": 10.0}}
BAD = {
    "list": b"[1, 2]",
    "text-int": {"choices": [{"text": 5, "index": 0, "finish_reason": None}]},
    "choices-str": {"choices": "abc"},
    "error-code-str": {"error": {"code": "abc", "message": "odd"}},
    "usage-negative": {**FINAL, "usage": {"prompt_tokens": -1, "completion_tokens": -5}},
    "usage-huge": {**FINAL, "usage": {"prompt_tokens": 1, "completion_tokens": 2**40}},
    "finish-list": {"choices": [{"text": "", "index": 0, "finish_reason": ["stop"]}]},
    "timings-str": {**FINAL, "timings": {"prompt_ms": "x", "predicted_per_second": "y"}},
    "null": b"null",
}

async def handle(reader, writer):
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        line, *rest = head.decode("latin-1").split("\r\n")
        method, path, _ = line.split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in rest if h)}
        await reader.readexactly(int(headers.get("content-length", "0")))
        if path == "/health":
            late = args.health_503_after >= 0 and time.monotonic() - started > args.health_503_after
            status, body = (503, b'{"error":"busy"}') if late else (200, b'{"status":"ok"}')
            writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (status, len(body), body))
            await writer.drain()
            return
        if args.mode == "http500-binary":
            body = b"\xff\xfe\x80 not utf-8"
            writer.write(b"HTTP/1.1 500 X\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            return
        if args.mode == "not-http":
            writer.write(b"garbage that is not HTTP\r\n\r\n")
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        writer.write(sse(GOOD))
        await writer.drain()
        if args.mode == "no-done":
            return  # the body ends (close-delimited) with no [DONE]; the process lives on
        if args.mode in BAD:
            writer.write(sse(BAD[args.mode]))
            if args.mode.startswith(("usage", "timings")):
                writer.write(b"data: [DONE]\n\n")
            await writer.drain()
            await asyncio.sleep(0.2)
            return
        writer.write(sse(GOOD) + sse(FINAL) + b"data: [DONE]\n\n")
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", args.port)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def hostile_model(name: str, tmp_path: Path, tiny_model: Path, *flags: str) -> str:
    """A catalog entry (TOML) running the hostile backend above with `flags`."""
    script = tmp_path / "hostile_backend.py"
    script.write_text(HOSTILE_BACKEND)
    command = [sys.executable, str(script), "--port", "{port}", "--model", "{path}", *flags]
    quoted = ", ".join(f'"{part}"' for part in command)
    return f'[models.{name}]\nrecipe = "command"\npath = "{tiny_model}"\ntype = "llm"\ncommand = [{quoted}]\n'
