"""The Python client (`lemonade_grpc.client`) on a real server: RPCs, error details, Watch across restarts."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import ServerFactory, fake_model, llama_model
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.client import DOMAIN, connect, error_details


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_load_pin_status_complete_and_chat(servers: ServerFactory, tiny_model: Path) -> None:
    server = servers.start(llama_model("tiny", tiny_model))
    async with connect(server.address) as client:
        progress = [p async for p in client.load("tiny", ctx_size=512)]
        pinned = await client.pin("tiny")
        status = await client.status()
        models = await client.models()
        completion = [r async for r in client.complete("tiny", "Hello", max_tokens=4, seed=1)]
        reply = [r async for r in client.chat("tiny", [("user", "Hi")], max_tokens=3, seed=1)]
        unloaded = await client.unload()
    phases = [p.phase for p in progress]
    assert phases[0] == pb.LOAD_PHASE_QUEUED
    assert phases[-1] == pb.LOAD_PHASE_READY
    assert progress[-1].status.options.ctx_size == 512
    assert pinned.pinned
    assert [(m.name, m.pinned) for m in status.models] == [("tiny", True)]
    assert [m.name for m in models] == ["tiny"]
    assert completion[-1].usage.completion_tokens == 4
    assert sum(r.token_count for r in completion) == 4
    assert reply[-1].usage.completion_tokens == 3
    assert unloaded == ["tiny"]


async def test_embed_tokenize_and_detokenize_on_the_default_models(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    server = servers.start()
    async with connect(server.address) as client:
        ids = await client.tokenize("smollm2", "Hello world")
        text = await client.detokenize("smollm2", ids)
        unit, raw = (
            await client.embed("smollm2-embed", ["Paris", "Paris"]),
            await client.embed("smollm2-embed", ["Paris"], normalize=False),
        )
    assert (ids, text) == ([19556, 905], "Hello world")
    assert len(unit) == 2
    assert abs(sum(x * x for x in unit[0]) - 1) < 1e-3
    assert abs(sum(x * x for x in raw[0]) - 1) > 1e-2
    assert sum(a * b for a, b in zip(unit[0], unit[1], strict=True)) > 0.9999  # the same text, vector


async def test_error_details_give_the_reason_and_the_fields_at_fault(
    servers: ServerFactory, tiny_model: Path
) -> None:
    server = servers.start(fake_model("m", tiny_model))
    async with connect(server.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await client.pin("nope")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            [p async for p in client.load("m", backend_args=["--tools", "all"])]
        nope: Any = client.channel.unary_unary("/lemonade.v1.ModelControl/Nope")  # raw bytes: untyped
        with pytest.raises(grpc.aio.AioRpcError) as unimplemented:
            await nope(b"")
    missing = error_details(unknown.value)
    assert (missing.code, missing.reason, missing.domain) == (
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
        DOMAIN,
    )
    assert str(missing).startswith("NOT_FOUND MODEL_NOT_FOUND: ")
    flags = error_details(refused.value)
    assert (flags.code, flags.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OPTIONS")
    assert flags.bad_fields == ("options.backend_args.args",)
    assert "--tools" in flags.message
    # gRPC's own errors carry no ErrorInfo: the reason is empty, the code says it all.
    plain = error_details(unimplemented.value)
    assert (plain.code, plain.reason, plain.bad_fields) == (grpc.StatusCode.UNIMPLEMENTED, "", ())


async def test_watch_resumes_across_a_server_restart_without_repeating_an_event(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    port = free_port()
    config = fake_model("m", tiny_model)
    state_dir = tmp_path / "state"
    first = servers.start(config, "--listen", f"127.0.0.1:{port}", state_dir=state_dir)
    seen: list[pb.WatchResponse] = []
    arrived = asyncio.Event()
    async with connect(f"127.0.0.1:{port}") as client:

        async def follow() -> None:
            async for message in client.watch():
                seen.append(message)
                arrived.set()

        async def until(predicate: Callable[[pb.WatchResponse], bool], what: str) -> pb.WatchResponse:
            async def found() -> pb.WatchResponse:
                while True:
                    for message in seen:
                        if predicate(message):
                            return message
                    arrived.clear()
                    await arrived.wait()

            try:
                return await asyncio.wait_for(found(), 30)
            except TimeoutError:
                pytest.fail(f"no Watch message {what}; saw {[m.WhichOneof('event') for m in seen]}")

        watcher = asyncio.create_task(follow())
        await until(lambda m: m.WhichOneof("event") == "snapshot", "snapshot")
        [p async for p in client.load("m")]
        loaded = await until(lambda m: m.WhichOneof("event") == "model_loaded", "m loaded")
        assert first.stop() == 0  # the Watch breaks; the client keeps trying
        before = len(seen)
        second = servers.start(config, "--listen", f"127.0.0.1:{port}", state_dir=state_dir)
        resync = await until(lambda m: m.resync, "a resync snapshot from the new run")
        [p async for p in client.load("m")]
        again = await until(
            lambda m: m.WhichOneof("event") == "model_loaded" and m.sequence > resync.sequence,
            "m loaded again",
        )
        watcher.cancel()
        second.stop()
    sequences = [m.sequence for m in seen]
    assert len(set(sequences)) == len(sequences), "an event was yielded twice"
    first_run = seen[:before]  # a snapshot, then every event after it, gap-free
    assert first_run[0].WhichOneof("event") == "snapshot"
    start = first_run[0].sequence
    assert [m.sequence for m in first_run] == list(range(start, start + len(first_run)))
    assert loaded in first_run
    # The new run numbers its events above the old one's: the old number could not be resumed.
    assert resync.sequence > loaded.sequence
    assert resync.WhichOneof("event") == "snapshot"
    assert list(resync.snapshot.models) == []  # m was not pinned: the new run starts empty
    after = [m for m in seen if m.sequence > resync.sequence]
    assert [m.sequence for m in after] == list(range(resync.sequence + 1, resync.sequence + 1 + len(after)))
    assert again in after
