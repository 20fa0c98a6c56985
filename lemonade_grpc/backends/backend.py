"""Backend: one running model server process and the client that talks to it."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import aiohttp

from lemonade_grpc.backends.openai_client import OpenAIClient
from lemonade_grpc.backends.process import BackendProcess
from lemonade_grpc.backends.recipes import backend_argv
from lemonade_grpc.backends.registry import BackendRegistry
from lemonade_grpc.catalog import ModelSpec
from lemonade_grpc.pool.errors import BackendStartFailed
from lemonade_grpc.pool.options import EffectiveOptions
from lemonade_grpc.provision.llama_server import LlamaServerNotFound

HEALTH_POLL_SECONDS = 0.02


def free_port() -> int:
    """A loopback port free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Backend:
    """A model server process on a loopback port. Created by `start`.

    Does not restart itself, and does not decide anything: the pool does.
    """

    def __init__(self, process: BackendProcess, port: int, registry: BackendRegistry | None = None) -> None:
        self.process = process
        self.port = port
        self._registry = registry
        self.client = OpenAIClient(f"http://127.0.0.1:{port}")

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def start(
        cls,
        spec: ModelSpec,
        options: EffectiveOptions,
        *,
        log_dir: Path,
        registry: BackendRegistry | None = None,
    ) -> Backend:
        """Spawn the backend for `spec` and record it in `registry`; does not wait for health.

        Raises `BackendStartFailed` when the program cannot be found or started.
        """
        port = free_port()
        try:
            argv = backend_argv(spec, options, port)
            process = await BackendProcess.spawn(argv, log_path=log_dir / f"{spec.name}.log")
        except (LlamaServerNotFound, OSError) as error:
            raise BackendStartFailed(f"cannot start backend for {spec.name}: {error}") from error
        if registry is not None:
            registry.add(process.pid, spec.name)
        return cls(process, port, registry)

    async def wait_healthy(self, limit_seconds: float) -> None:
        """Poll GET /health until it answers 200.

        Raises `BackendStartFailed` with the end of the backend's log when the
        process exits first or `limit_seconds` pass. Does not stop the
        process on failure: the caller owns it.
        """
        deadline = time.monotonic() + limit_seconds
        while True:
            if self.process.returncode is not None:
                raise BackendStartFailed(
                    f"backend exited with status {self.process.returncode} while starting:\n"
                    f"{self.process.log_tail()}"
                )
            try:
                if await self.client.health() == 200:
                    return
            except (aiohttp.ClientError, TimeoutError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise BackendStartFailed(
                    f"backend not healthy after {limit_seconds:g} s:\n{self.process.log_tail()}"
                )
            await asyncio.sleep(HEALTH_POLL_SECONDS)

    async def is_healthy(self, limit_seconds: float) -> bool:
        """Whether GET /health answers 200 within `limit_seconds`."""
        try:
            return await self.client.health(limit_seconds) == 200
        except (aiohttp.ClientError, TimeoutError, RuntimeError):
            return False  # RuntimeError: the session was closed under the request

    async def stop(self, grace: float) -> int:
        """Stop the process, then close the client; return the exit status. Idempotent.

        In that order: requests streaming from the process see its connection
        break (an aiohttp.ClientError) rather than their session closed under
        them.
        """
        status = await self.process.stop(grace)
        await self.client.close()
        if self._registry is not None:
            self._registry.remove(self.pid)
        return status
