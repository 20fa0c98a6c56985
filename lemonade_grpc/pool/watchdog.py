"""Crashes are seen (DESIGN.md item 8): a READY backend that exits or stops answering.

The watchdog only observes and reports (`on_failure(model, message)`); the
pool decides what a failure means (FAILED, revoked requests, a restart).
`CrashHistory` keeps when each model crashed, for the restart backoff.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from lemonade_grpc.core.settings import PoolSettings
from lemonade_grpc.core.tasks import TaskOwner
from lemonade_grpc.pool import policy
from lemonade_grpc.pool.model import Model, ModelState


class Watchdog:
    """Watches READY backends; calls `on_failure` at most once per backend it watches.

    An exit is seen at once. A hang is `health_check_failures` failed
    health checks in a row, one every `health_check_seconds`, each given
    `health_check_timeout_seconds`; a check that fails while the backend
    sent bytes to a request since the check began does not count (it is
    busy generating, not hung). Watching stops by itself once the model is
    no longer READY.

    A check is a GET /health while a request holds the model, when the
    backend served one since the last GET, after a failed check, or when
    the last GET is `idle_health_check_seconds` old; otherwise (an idle
    backend) it is one
    read of the process's state in /proc, which sees a stopped process as
    soon as a GET would, at a tenth of the CPU (issue 13: the GETs were most
    of an idle server's CPU time). A deadlocked idle backend that is not
    stopped is found by the next GET, at most that long later.
    """

    def __init__(
        self, settings: PoolSettings, owner: TaskOwner, on_failure: Callable[[Model, str], object]
    ) -> None:
        self._settings = settings
        self._owner = owner
        self._on_failure = on_failure

    def watch(self, model: Model) -> None:
        """Start watching READY `model`'s backend. Call once per backend."""
        assert model.backend is not None
        assert model.state is ModelState.READY
        self._owner.spawn(self._watch_exit(model), f"watch exit {model.name}")
        if self._settings.health_check_seconds > 0:
            self._owner.spawn(self._watch_health(model), f"watch health {model.name}")

    async def _watch_exit(self, model: Model) -> None:
        assert model.backend is not None
        status = await model.backend.process.wait()
        if model.state is ModelState.READY:
            self._on_failure(model, f"exited with status {status}")

    async def _watch_health(self, model: Model) -> None:
        backend = model.backend
        assert backend is not None
        interval = self._settings.health_check_seconds
        timeout = self._settings.health_check_timeout_seconds
        failures = 0
        last_get = time.monotonic()  # the readiness check was a GET
        next_check = last_get + interval
        while model.state is ModelState.READY:
            await asyncio.sleep(max(0.0, next_check - time.monotonic()))
            if model.state is not ModelState.READY:
                return
            started = time.monotonic()
            next_check = started + interval
            if (
                failures
                or model.leases  # a request waiting on a backend that hangs before answering
                or backend.client.last_activity >= last_get
                or started - last_get >= self._settings.idle_health_check_seconds
            ):
                last_get = started
                healthy = await backend.is_healthy(timeout)
            else:
                healthy = not backend.process.stopped()
            busy = backend.client.last_activity >= started  # it streamed bytes meanwhile
            failures = 0 if healthy or busy else failures + 1
            if failures >= self._settings.health_check_failures:
                if model.state is ModelState.READY:
                    self._on_failure(
                        model,
                        f"stopped answering /health ({failures} checks in a row,"
                        f" {interval:g} s apart, {timeout:g} s each)",
                    )
                return


class CrashHistory:
    """When each model crashed, and how long to wait before restarting it."""

    def __init__(self, settings: PoolSettings, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._clock = clock
        self._crashes: dict[str, list[float]] = {}

    def record(self, name: str) -> tuple[int, float | None]:
        """Note a crash of `name` now; return the recent crash count and the restart delay (None: give up)."""
        now = self._clock()
        crashes = self._crashes.setdefault(name, [])
        crashes.append(now)
        # Only the last max_restarts + 1 matter to the decision: bounded.
        del crashes[: -(self._settings.max_restarts + 1)]
        delay = policy.restart_delay(
            crashes,
            now,
            base=self._settings.restart_backoff_seconds,
            cap=self._settings.restart_backoff_max_seconds,
            max_restarts=self._settings.max_restarts,
            window=self._settings.restart_window_seconds,
        )
        return len(crashes), delay
