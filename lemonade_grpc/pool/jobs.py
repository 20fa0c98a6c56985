"""Load jobs: one load, queued or running, that identical requests share.

A job belongs to the pool, not to the request that created it (DESIGN.md
lesson 9): its followers may come and go (a client cancels, its deadline
passes) and the job runs on; only `Pool.unload` and shutdown cancel it.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass

from lemonade_grpc.core.errors import LemonadeError
from lemonade_grpc.core.options import RequestedOptions
from lemonade_grpc.pool.events import LoadPhase, LoadProgress
from lemonade_grpc.pool.model import ModelView


class LoadOrigin(enum.Enum):
    """Who asked for a load."""

    REQUEST = "request"  # a Load call
    INFERENCE = "inference"  # a request for a model that was not loaded
    RESTORE = "restore"  # a pin saved by the previous run, at boot
    RESTART = "restart"  # a pinned model, after its backend crashed


@dataclass(frozen=True, slots=True)
class LoadResult:
    """How a load ended when it ended well."""

    model: ModelView
    already_loaded: bool
    evicted: tuple[str, ...]


JobKey = tuple[str, RequestedOptions, bool | None, bool]


def job_key(name: str, requested: RequestedOptions, pinned: bool | None, origin: LoadOrigin) -> JobKey:
    """Requests with the same key are the same load (an inference's load is joined only by inferences)."""
    return (name, requested, pinned, origin is LoadOrigin.INFERENCE)


class LoadJob:
    """One load, queued or running. Identical concurrent requests share it.

    `follow` replays the progress so far and then streams the rest, so a
    request that joins late still sees every phase (DESIGN.md item 3). Every
    settled state wakes every follower. `waiters` counts the requests
    following it now (Status shows it; it goes down when one leaves).
    """

    def __init__(
        self,
        name: str,
        requested: RequestedOptions,
        pinned: bool | None,
        origin: LoadOrigin,
        started_at: float,
    ) -> None:
        self.name = name
        self.requested = requested
        self.pinned = pinned
        self.origin = origin
        self.started_at = started_at
        self.waiters = 0
        self.history: list[LoadProgress] = []
        self.evicted: list[str] = []
        # Set by the load path: the model's pin was in force when this load
        # began (a pinned model crashed, or being reloaded). Its failure then
        # keeps the pin and restarts the model (issue 18 finding 2).
        self.pin_in_force = False
        self.task: asyncio.Task[None] | None = None
        # What a cancellation means: set by whoever cancels the task
        # (Unload: LOAD_CANCELLED; shutdown: SHUTTING_DOWN).
        self.cancel_error: LemonadeError | None = None
        self._wake = asyncio.Event()
        self._result: LoadResult | None = None
        self._error: LemonadeError | None = None
        self._done = False

    @property
    def key(self) -> JobKey:
        return job_key(self.name, self.requested, self.pinned, self.origin)

    @classmethod
    def settled(cls, name: str, result: LoadResult) -> LoadJob:
        """A job that is over before it began: the request needed nothing done."""
        job = cls(name, RequestedOptions(), None, LoadOrigin.REQUEST, 0.0)
        job.finish(result, None)
        return job

    @property
    def phase(self) -> LoadPhase:
        return self.history[-1].phase if self.history else LoadPhase.QUEUED

    @property
    def fraction(self) -> float:
        return self.history[-1].fraction if self.history else -1.0

    @property
    def done(self) -> bool:
        return self._done

    def emit(self, progress: LoadProgress) -> None:
        """Record a progress message and wake the followers. Pool only."""
        self.history.append(progress)
        self._wake_all()

    def finish(self, result: LoadResult | None, error: LemonadeError | None) -> None:
        """Settle the job with its result or error; later calls are ignored. Pool only."""
        if self._done:
            return
        self._result, self._error, self._done = result, error, True
        self._wake_all()

    def _wake_all(self) -> None:
        # Every settled state wakes every waiter: replace the event so that
        # followers waiting on the old one all run.
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()

    async def follow(self) -> AsyncIterator[LoadProgress]:
        """Yield every progress message, from the first, until the load ends.

        Does not yield the READY message: call `outcome` after the iteration.
        Leaving early (the client went away) detaches this follower only.
        """
        index = 0
        self.waiters += 1
        try:
            while True:
                wake = self._wake
                while index < len(self.history):
                    yield self.history[index]
                    index += 1
                if self._done:
                    return
                await wake.wait()
        finally:
            self.waiters -= 1

    async def outcome(self) -> LoadResult:
        """Wait for the load to end; return its result or raise its `LemonadeError`.

        Cancelling the caller detaches it; the load goes on.
        """
        if not self._done:
            self.waiters += 1
            try:
                while not self._done:
                    await self._wake.wait()
            finally:
                self.waiters -= 1
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result
