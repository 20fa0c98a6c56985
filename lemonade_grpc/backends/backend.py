"""Backend: one running model server process and the client that talks to it.

`Backend.launch` is the whole start: spawn, record in the registry, wait
until healthy, and prove that what answers on the port is our process.
Whatever it spawned is stopped before it raises, cancellation included
(DESIGN.md lesson 7, "no orphans").
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

from lemonade_grpc.backends.http import BackendConnectionError
from lemonade_grpc.backends.openai_client import OpenAIClient
from lemonade_grpc.backends.process import BackendProcess, port_holder
from lemonade_grpc.backends.progress import ModelBytes, ProgressEstimate
from lemonade_grpc.backends.recipes import backend_argv
from lemonade_grpc.core.catalog import ModelSpec, Recipe
from lemonade_grpc.core.errors import (
    BackendStartFailed,
    StateWriteFailed,
    exhausted_resource,
    server_resources_exhausted,
)
from lemonade_grpc.core.options import EffectiveOptions
from lemonade_grpc.core.settings import BackendLogSettings
from lemonade_grpc.core.tasks import settle, wait_for_any
from lemonade_grpc.provision.llama_server import LlamaServerNotFound
from lemonade_grpc.store.backend_records import BackendRegistry

log = logging.getLogger(__name__)

HEALTH_POLL_SECONDS = 0.02
HEALTH_REQUEST_SECONDS = 5.0
# How often a load's progress is read from /proc and reported (at most).
PROGRESS_SECONDS = 0.25
# A line by which a server says it is listening: llama-server's "listening on
# http://127.0.0.1:PORT", uvicorn's "running on", and the like. It wakes the
# readiness check at once instead of at its next poll.
READY_HINT = re.compile(
    r"listening on|running on|server started|started server|ready to accept", re.IGNORECASE
)

ProgressCallback = Callable[[float, str], None]


def free_port() -> int:
    """A loopback port free at the time of the call (someone else may take it before the backend binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PortTaken(BackendStartFailed):
    """Another process holds the port chosen for the backend: the start lost the race for it.

    `holder` describes that process ("pid 123 (python3)"), or says it is unknown.
    """

    def __init__(self, message: str, *, port: int, holder: str) -> None:
        super().__init__(message)
        self.port = port
        self.holder = holder


class Backend:
    """A model server process on a loopback port. Created by `launch`.

    Does not restart itself, and does not decide anything: the pool does.
    """

    def __init__(
        self,
        process: BackendProcess,
        port: int,
        registry: BackendRegistry | None = None,
        load_progress: ProgressEstimate | None = None,
    ) -> None:
        self.process = process
        self.port = port
        self._registry = registry
        self.client = OpenAIClient(f"http://127.0.0.1:{port}")
        # The model's vocabulary size once asked for (Detokenize checks ids against it).
        self.vocabulary: int | None = None
        self._stopping: asyncio.Task[int] | None = None
        # Until it is ready: its output wakes the readiness check and feeds the load's progress.
        self._ready_hint = asyncio.Event()
        self._load_progress = load_progress
        self._stop_following = process.output.listen(self._follow)

    def _follow(self, line: str) -> None:
        if READY_HINT.search(line):
            self._ready_hint.set()
        if self._load_progress is not None:
            self._load_progress.line(line)

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def launch(
        cls,
        spec: ModelSpec,
        options: EffectiveOptions,
        *,
        log_dir: Path,
        registry: BackendRegistry | None,
        health_timeout: float,
        stop_grace: float,
        on_spawned: Callable[[Backend], None] | None = None,
        on_progress: ProgressCallback | None = None,
        progress_seconds: float = PROGRESS_SECONDS,
        choose_port: Callable[[], int] = free_port,
        attempts: int = 3,
        log_settings: BackendLogSettings | None = None,
    ) -> Backend:
        """Start the backend for `spec` and return it READY: spawned, recorded, healthy, proven ours.

        Each attempt: pick a port with `choose_port`, spawn, call
        `on_spawned(backend)`, record the pid in `registry` (durably), then poll /health
        (up to `health_timeout` seconds per attempt), at once when the
        backend prints that it listens (`READY_HINT`), else every
        `HEALTH_POLL_SECONDS`. Meanwhile, for llama-server, `on_progress(fraction,
        message)` is called at most every `progress_seconds` when the load's
        progress changed (`backends.progress`). A 200 counts only if
        the process or one of its descendants listens on the port (issue 9,
        finding 8: any process that took the port first could answer). When
        another process holds the port, whether it answered 200 or ours
        exited on "address already in use", ours is stopped and the next
        attempt uses a new port, up to `attempts` in all. Its output goes to
        `log_dir/NAME.log`, kept within `log_settings` (issue 18 finding 6).

        Raises `BackendStartFailed` (the program cannot start, it exited or
        stayed unhealthy, with this run's log; or every attempt lost the port,
        naming the port and its holder) and `StateWriteFailed` (the registry
        cannot be written, issue 9 finding 3). Before raising, and when
        cancelled, it stops (`stop_grace`) every process it spawned and
        waits for it: nothing is left running, even if the caller is
        cancelled during that cleanup. An exception from `on_spawned` is a
        failure too. Each call starts its own process: not idempotent.
        """
        lost: PortTaken | None = None
        for _ in range(max(1, attempts)):
            port = choose_port()
            backend = await cls._spawn(spec, options, port, log_dir, registry, log_settings)
            try:
                if on_spawned is not None:
                    on_spawned(backend)
                await backend._record(spec.name)
                await backend._wait_ready(health_timeout, spec, on_progress, progress_seconds)
            except PortTaken as error:
                await settle(asyncio.ensure_future(backend.stop(stop_grace)))
                log.warning("%s: %s; retrying on another port", spec.name, error.message)
                lost = error
                continue
            except BaseException:
                await settle(asyncio.ensure_future(backend.stop(stop_grace)))
                raise
            return backend
        assert lost is not None
        raise BackendStartFailed(
            f"cannot start backend for {spec.name}: another process took its port "
            f"{max(1, attempts)} times; last: {lost.message}"
        )

    @classmethod
    async def _spawn(
        cls,
        spec: ModelSpec,
        options: EffectiveOptions,
        port: int,
        log_dir: Path,
        registry: BackendRegistry | None,
        log_settings: BackendLogSettings | None = None,
    ) -> Backend:
        """Spawn the process; raises BackendStartFailed, with nothing left running, when it cannot."""
        try:
            argv = backend_argv(spec, options, port)
            # Its size first: progress is measured against it (llama-server only: its log names the stages).
            size = spec.path.stat().st_size if spec.recipe is Recipe.LLAMACPP else None
            # Marked before it exists: a crash of ours between the spawn and the
            # record leaves a process the next boot finds all the same (issue 18 finding 10).
            env = {**os.environ, **registry.marks(spec.name)} if registry is not None else None
            process = await BackendProcess.spawn(
                argv, log_path=log_dir / f"{spec.name}.log", env=env, log_settings=log_settings
            )
        except (LlamaServerNotFound, OSError) as error:
            shortage = exhausted_resource(error)
            if shortage is not None:  # ours, not the backend's (issue 18 finding 5)
                raise server_resources_exhausted(shortage) from error
            raise BackendStartFailed(f"cannot start backend for {spec.name}: {error}") from error
        # Created before any await: the backend's first lines are not missed.
        return cls(process, port, registry, ProgressEstimate(size) if size is not None else None)

    async def _record(self, model: str) -> None:
        """Record the process in the registry, durably; StateWriteFailed when the file cannot be written."""
        if self._registry is None:
            return
        try:
            await self._registry.add(self.pid, model)
        except OSError as error:
            shortage = exhausted_resource(error)
            if shortage is not None:
                raise server_resources_exhausted(shortage) from error
            raise StateWriteFailed(
                f"cannot record the backend of {model} (pid {self.pid}) in {self._registry.path}: {error}"
            ) from error

    async def _wait_ready(
        self,
        limit_seconds: float,
        spec: ModelSpec,
        on_progress: ProgressCallback | None,
        progress_seconds: float,
    ) -> None:
        reporter = None
        if on_progress is not None and self._load_progress is not None:
            reporter = asyncio.ensure_future(
                self._report_progress(self._load_progress, spec.path, on_progress, progress_seconds)
            )
        try:
            await self._poll_ready(limit_seconds)
        finally:
            self._stop_following()
            if reporter is not None:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)

    async def _report_progress(
        self, progress: ProgressEstimate, model: Path, report: ProgressCallback, seconds: float
    ) -> None:
        """Read how far the load has got every `seconds`; report it when it changed."""
        last: tuple[float, str] | None = None
        probe = ModelBytes(self.pid, model)
        while True:
            await asyncio.sleep(seconds)
            progress.read(await asyncio.to_thread(probe.read))
            now = (progress.fraction, progress.message)
            if now != last:
                report(*now)
                last = now

    async def _poll_ready(self, limit_seconds: float) -> None:
        deadline = time.monotonic() + limit_seconds
        hinted = False
        while True:
            if self.process.returncode is not None:
                # "Address already in use": someone took the port between our choosing it and the bind.
                holder = await asyncio.to_thread(port_holder, self.port)
                if holder is not None:
                    raise self._port_taken(
                        holder, f"the backend exited with status {self.process.returncode}"
                    )
                raise BackendStartFailed(
                    f"backend exited with status {self.process.returncode} while starting:\n"
                    f"{self.process.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            try:
                status = await self.client.health(max(0.1, min(HEALTH_REQUEST_SECONDS, remaining)))
            except (BackendConnectionError, TimeoutError):
                status = 0  # not listening yet
            if status == 200:
                # Checked once, on the first 200, not at every poll: it reads /proc.
                if await asyncio.to_thread(self.process.listens_on, self.port):
                    return
                holder = await asyncio.to_thread(port_holder, self.port)
                raise self._port_taken(holder or "an unknown process", "it answered /health in our place")
            if time.monotonic() > deadline:
                holder = await asyncio.to_thread(port_holder, self.port)
                if holder is not None and not await asyncio.to_thread(self.process.listens_on, self.port):
                    raise self._port_taken(holder, "the backend never became healthy")
                raise BackendStartFailed(
                    f"backend not healthy after {limit_seconds:g} s:\n{self.process.log_tail()}"
                )
            if hinted:
                # A hint that did not make it ready (a line that only looked like one):
                # a whole interval before the next check, or such lines would make this
                # a busy poll (issue 12: 1,857 checks in 2 s for "layer 3 running on CPU").
                await asyncio.sleep(HEALTH_POLL_SECONDS)
                hinted = False
            else:
                # The next poll, or sooner: when the backend says it listens.
                await wait_for_any([self._ready_hint], HEALTH_POLL_SECONDS)
                hinted = self._ready_hint.is_set()
            self._ready_hint.clear()

    def _port_taken(self, holder: str, what: str) -> PortTaken:
        return PortTaken(
            f"port {self.port} is held by {holder}, not by the backend (pid {self.pid}): {what}",
            port=self.port,
            holder=holder,
        )

    async def is_healthy(self, limit_seconds: float) -> bool:
        """Whether GET /health answers 200 within `limit_seconds`. False after `stop`; never raises."""
        try:
            return await self.client.health(limit_seconds) == 200
        except (BackendConnectionError, TimeoutError):
            return False

    async def stop(self, grace: float) -> int:
        """Stop the process group, close the client, forget the registry record; return the exit status.

        SIGTERM, then SIGKILL after `grace` seconds (the first call's grace
        wins). In that order: requests streaming from the process see its
        connection break (a BackendConnectionError) rather than their client
        closed under them. Idempotent and safe to call concurrently; the
        stop runs to its end even if the caller is cancelled (it raises
        CancelledError then, the stop going on).
        """
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
            self._stopping.add_done_callback(_read_outcome)
        return await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> int:
        status = await self.process.stop(grace)
        await self.client.close()
        if self._registry is not None:
            await self._registry.remove(self.pid)
        return status


def _read_outcome(task: asyncio.Task[int]) -> None:
    """Read a stop task's exception so none goes unretrieved when its caller was cancelled."""
    if not task.cancelled() and task.exception() is not None:
        log.error("stopping a backend failed", exc_info=task.exception())
