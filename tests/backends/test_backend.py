"""Backends in-process: launch, readiness proof, registry failures, logs, the closed client (issue 9).

Each test stops what it starts and checks the processes are gone: these
backends are children of the test process, not of a tagged server.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import FAKE_BACKEND, eventually, launch_backend, release_tokens
from in_process import FAKE, OPTIONS, shell_spec
from lemonade_grpc.backends import backend as backend_module
from lemonade_grpc.backends.backend import Backend, PortTaken, free_port
from lemonade_grpc.backends.http import BackendConnectionError
from lemonade_grpc.backends.openai_client import OpenAIClient
from lemonade_grpc.core.catalog import ModelSpec, ModelType, Recipe
from lemonade_grpc.core.errors import BackendStartFailed, StateWriteFailed
from lemonade_grpc.store.backend_records import BackendRegistry
from lemonade_grpc.testing import is_gone


def fake_spec(model: Path, *flags: str, name: str = "fake") -> ModelSpec:
    command = (sys.executable, str(FAKE_BACKEND), "--port", "{port}", "--model", "{path}", *flags)
    return ModelSpec(name, Recipe.COMMAND, model, ModelType.LLM, OPTIONS, command=command)


def llama_spec(model: Path) -> ModelSpec:
    return ModelSpec("llama", Recipe.LLAMACPP, model, ModelType.LLM, OPTIONS)


class Impostor:
    """An HTTP server of the test's own, answering `status` to every request: a stranger on a port."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            body = b'{"status":"ok"}'
            head = f"HTTP/1.1 {self.status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def impostor() -> AsyncIterator[Impostor]:
    server = Impostor()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def first_then_free(port: int) -> Callable[[], int]:
    """A `choose_port` whose first answer is `port`, the next ones free ports."""
    answers = iter([port])
    return lambda: next(answers, None) or free_port()


async def impostor_answers(port: int) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/health") as response,
    ):
        return response.status


async def complete(backend: Backend, prompt: str = "hello") -> tuple[str, int | None]:
    """Stream a completion; return its text and the completion token count."""
    texts: list[str] = []
    tokens: int | None = None
    async for batch in backend.client.stream("/v1/completions", {"prompt": prompt, "max_tokens": 8}):
        for chunk in batch:
            texts.append(chunk.text)
            tokens = chunk.completion_tokens if chunk.completion_tokens is not None else tokens
    return "".join(texts), tokens


# --- finding 8: readiness proves the process ---------------------------------------------------


@pytest.mark.parametrize("kind", ["fake", "llama-server"])
async def test_readiness_ignores_an_impostor_on_the_port_and_retries(
    kind: str,
    impostor: Impostor,
    tiny_model: Path,
    llama_server_binary: Path,
    tmp_path: Path,
    spawned: list[Backend],
) -> None:
    # The fake binds late, so the impostor's 200 arrives while ours is alive, not listening.
    spec = fake_spec(tiny_model, "--listen-delay-seconds", "1") if kind == "fake" else llama_spec(tiny_model)
    registry = BackendRegistry(tmp_path / "state" / "backends.json")
    backend = await launch_backend(
        spec, tmp_path / "logs", spawned, registry=registry, choose_port=first_then_free(impostor.port)
    )
    try:
        assert backend.port != impostor.port
        assert [b.port for b in spawned] == [impostor.port, backend.port]
        assert is_gone(spawned[0].pid), "the backend that lost the port still runs"
        text, tokens = await complete(backend)
        assert text
        assert tokens
        if kind == "fake":  # llama-server may exit ("address in use") before the first poll
            assert impostor.requests >= 1, "the impostor's 200 was never tried"
        assert await impostor_answers(impostor.port) == 200  # untouched
        recorded = json.loads(registry.path.read_text())["backends"]
        assert [r["pid"] for r in recorded] == [backend.pid]
    finally:
        await backend.stop(2.0)
    assert is_gone(backend.pid)
    assert json.loads(registry.path.read_text())["backends"] == []


async def test_a_backend_that_exits_because_its_port_is_taken_is_retried_on_another(
    impostor: Impostor, tiny_model: Path, tmp_path: Path, spawned: list[Backend]
) -> None:
    impostor.status = 503  # "loading" forever: only our process's exit tells the race was lost
    backend = await launch_backend(
        fake_spec(tiny_model), tmp_path / "logs", spawned, choose_port=first_then_free(impostor.port)
    )
    try:
        assert spawned[0].process.returncode not in (None, 0), "the first backend should have failed to bind"
        assert backend.port != impostor.port
        assert (await complete(backend))[1] == 8
    finally:
        await backend.stop(2.0)
    assert all(is_gone(b.pid) for b in spawned)


async def test_a_start_that_loses_its_port_every_time_fails_naming_the_port_and_holder(
    impostor: Impostor, tiny_model: Path, tmp_path: Path, spawned: list[Backend]
) -> None:
    with pytest.raises(BackendStartFailed) as raised:
        await launch_backend(
            fake_spec(tiny_model, "--listen-delay-seconds", "1"),
            tmp_path / "logs",
            spawned,
            choose_port=lambda: impostor.port,
            attempts=2,
        )
    assert not isinstance(raised.value, PortTaken)
    assert raised.value.reason == "BACKEND_START_FAILED"
    assert f"port {impostor.port}" in raised.value.message
    assert f"pid {os.getpid()}" in raised.value.message
    assert len(spawned) == 2
    assert all(is_gone(b.pid) for b in spawned)


# --- finding 3: a registry entry that cannot be written never orphans a backend ------------------


async def test_an_unwritable_state_dir_fails_the_load_and_leaves_no_backend(
    tiny_model: Path, tmp_path: Path, spawned: list[Backend]
) -> None:
    state_dir = tmp_path / "state"
    # A directory where the registry's temporary file goes: unwritable even for root.
    blocker = state_dir / ".backends.json.tmp"
    blocker.mkdir(parents=True)
    registry = BackendRegistry(state_dir / "backends.json")
    spec = fake_spec(tiny_model)
    for attempt in (1, 2):  # a retry fails the same way, cleanly again
        with pytest.raises(StateWriteFailed) as raised:
            await launch_backend(spec, tmp_path / "logs", spawned, registry=registry)
        assert raised.value.reason == "STATE_WRITE_FAILED"
        assert str(registry.path) in raised.value.message
        assert "Is a directory" in raised.value.message
        assert len(spawned) == attempt
        # Stopped and waited for before the launch raised: no polling needed.
        assert is_gone(spawned[-1].pid), "a backend that could not be recorded runs"
        assert spawned[-1].pid not in registry
    blocker.rmdir()
    backend = await launch_backend(spec, tmp_path / "logs", spawned, registry=registry)
    assert [r["pid"] for r in json.loads(registry.path.read_text())["backends"]] == [backend.pid]
    await backend.stop(2.0)
    assert is_gone(backend.pid)
    assert json.loads(registry.path.read_text())["backends"] == []


async def test_a_registry_entry_that_cannot_be_removed_is_logged_not_raised(
    tiny_model: Path, tmp_path: Path, spawned: list[Backend], caplog: pytest.LogCaptureFixture
) -> None:
    registry = BackendRegistry(tmp_path / "state" / "backends.json")
    backend = await launch_backend(fake_spec(tiny_model), tmp_path / "logs", spawned, registry=registry)
    (tmp_path / "state" / ".backends.json.tmp").mkdir()
    assert await backend.stop(2.0) is not None
    assert is_gone(backend.pid)
    assert backend.pid not in registry
    assert "cannot forget backend pid" in caplog.text


# --- cancellation: whatever a launch spawned is stopped ------------------------------------------


async def test_cancelling_a_launch_stops_what_it_spawned_before_the_cancellation_returns(
    tiny_model: Path, tmp_path: Path, spawned: list[Backend]
) -> None:
    registry = BackendRegistry(tmp_path / "state" / "backends.json")
    task = asyncio.create_task(
        launch_backend(
            fake_spec(tiny_model, "--load-seconds", "60"), tmp_path / "logs", spawned, registry=registry
        )
    )
    await eventually(lambda: bool(spawned), 10, "the backend to spawn")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert is_gone(spawned[0].pid), "cancelled launch left its backend running"
    assert spawned[0].pid not in registry


# --- finding 14: a failed start's message shows only this run's log ------------------------------


async def test_a_failed_start_shows_only_this_runs_log(
    tiny_model: Path, tmp_path: Path, spawned: list[Backend]
) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "fake.log").write_text("EARLIER RUN: something else went wrong\n" * 3)
    with pytest.raises(BackendStartFailed) as raised:
        await launch_backend(fake_spec(tiny_model, "--fail-start"), log_dir, spawned)
    assert "failing at start as asked" in raised.value.message
    assert "EARLIER RUN" not in raised.value.message
    assert "EARLIER RUN" in (log_dir / "fake.log").read_text()  # appended to, not truncated


# --- finding 13: no HTTP session after close; last_activity -------------------------------------


async def test_a_stopped_backends_client_never_connects_again(
    tiny_model: Path, tmp_path: Path, spawned: list[Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    connections: list[tuple[Any, ...]] = []
    loop = asyncio.get_running_loop()
    connect = loop.create_connection

    async def counted_connect(*args: Any, **kwargs: Any) -> Any:
        connections.append(args[1:])
        return await connect(*args, **kwargs)

    monkeypatch.setattr(loop, "create_connection", counted_connect)
    problems: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: problems.append(context))
    try:
        before = len(connections)
        pid = await stop_then_check_health(
            tiny_model, tmp_path, spawned, after_stop=lambda: connections[before:]
        )
        spawned.clear()  # the last reference: the backend and its client are collected now
        # Anything left open warns from __del__ (an error under -W error) or calls the loop's handler.
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert not problems, [p.get("message") for p in problems]
    assert is_gone(pid)


async def stop_then_check_health(
    tiny_model: Path,
    tmp_path: Path,
    spawned: list[Backend],
    after_stop: Callable[[], list[Any]] = list,
) -> int:
    backend = await launch_backend(fake_spec(tiny_model), tmp_path / "logs", spawned)
    assert await backend.is_healthy(5)
    await backend.stop(2.0)
    made = len(after_stop())
    for _ in range(20):  # what the watchdog did; each check reopened a session
        assert not await backend.is_healthy(1)
    await backend.stop(2.0)  # idempotent
    assert len(after_stop()) == made, "health checks after the stop connected to the backend"
    return backend.pid


async def test_a_closed_client_refuses_every_request() -> None:
    client = OpenAIClient(f"http://127.0.0.1:{free_port()}")
    await client.close()
    await client.close()  # idempotent
    assert client.closed
    with pytest.raises(BackendConnectionError, match="client closed"):
        await client.health()
    with pytest.raises(BackendConnectionError, match="client closed"):
        async for _ in client.stream("/v1/completions", {"prompt": "p"}):
            pass


async def test_last_activity_moves_with_each_read(
    tiny_model: Path, tmp_path: Path, spawned: list[Backend]
) -> None:
    # One token per step of the test, so one per read (issue 18 finding 12: timed
    # tokens came several to a read on a loaded machine).
    backend = await launch_backend(fake_spec(tiny_model, "--stepped"), tmp_path / "logs", spawned)
    try:
        assert backend.client.last_activity == 0.0  # /health answers are not activity
        await backend.client.health()
        before = time.monotonic()
        assert backend.client.last_activity == 0.0
        reads: list[float] = []
        stream = backend.client.stream("/v1/completions", {"prompt": "p", "max_tokens": 5})
        for _ in range(5):
            following = asyncio.ensure_future(anext(stream))
            await release_tokens(backend.port, 1)
            await following
            reads.append(backend.client.last_activity)
        async for _ in stream:  # the end of the stream
            reads.append(backend.client.last_activity)
        assert reads == sorted(reads)
        assert len(set(reads)) == len(reads) >= 5
        assert reads[0] > before
    finally:
        await backend.stop(2.0)
    assert is_gone(backend.pid)


# --- issue 12: readiness follows the backend's output --------------------------------------------


async def test_llama_servers_listening_line_makes_it_ready_without_waiting_for_a_poll(
    tiny_model: Path,
    llama_server_binary: Path,
    tmp_path: Path,
    spawned: list[Backend],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A poll an hour apart: the launch can only end within the test's time if the
    # "listening on" line wakes the readiness check.
    monkeypatch.setattr(backend_module, "HEALTH_POLL_SECONDS", 3600.0)
    backend = await launch_backend(llama_spec(tiny_model), tmp_path, spawned, health_timeout=7200.0)
    try:
        assert await backend.is_healthy(5.0)
        assert backend.process.listens_on(backend.port)
    finally:
        await backend.stop(2.0)
    # Its output reached the log file as well as the listeners.
    log = (tmp_path / "llama.log").read_text()
    assert "model loaded" in log
    assert "listening on" in log


async def test_lines_that_mention_running_on_do_not_turn_readiness_into_a_busy_poll(
    tiny_model: Path, tmp_path: Path, spawned: list[Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A backend that logs "running on CPU" every millisecond while it loads (2 s before it binds).
    loop = "import time\nwhile True: print('layer 3 running on CPU', flush=True); time.sleep(0.001)"
    chatter = f'{sys.executable} -c "{loop}"'
    spec = shell_spec("chatty", tiny_model, f"{chatter} & exec {FAKE} --listen-delay-seconds 2")
    polls = 0
    health = OpenAIClient.health

    async def counted(self: OpenAIClient, *args: Any, **kwargs: Any) -> int:
        nonlocal polls
        polls += 1
        return await health(self, *args, **kwargs)

    monkeypatch.setattr(OpenAIClient, "health", counted)
    started = time.monotonic()
    backend = await launch_backend(spec, tmp_path / "logs", spawned)
    took = time.monotonic() - started
    await backend.stop(1.0)
    # Polling every HEALTH_POLL_SECONDS (20 ms) is about 50 a second.
    assert polls <= 3 * took / backend_module.HEALTH_POLL_SECONDS, f"{polls} health polls in {took:.1f} s"
