"""Admission: how many inference streams run at once, and who waits (the `[limits]` table).

At most `max_streams` streams run in all and `max_streams_per_model` on any
one model; up to `max_queued` more wait, first come first served among those
that could run (a stream waiting for a busy model never holds back one for
another model: no head-of-line blocking). Beyond the queue, `admit` raises
`Overloaded` at once, naming the figures (issue 9, finding 7: 1,100 streams
ran the server out of file descriptors, and the failures were reported as
backend crashes).

Cancellation at any await leaves the counts right: a waiter cancelled after
it was admitted hands its slot on. At shutdown `close` ends every waiter, and
refuses every later stream, with `ShuttingDown`: a queued stream must not
wait through the grace period for a slot it can never use (its holder may be
stuck writing to a client that stopped reading).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from lemonade_grpc.core.errors import Overloaded, ShuttingDown


@dataclass(frozen=True, slots=True)
class AdmissionView:
    """Streams running and waiting now."""

    running: int
    queued: int


@dataclass(slots=True, eq=False)
class _Waiter:
    model: str
    admitted: asyncio.Future[None]


class Admission:
    """Stream slots, in all and per model, with a bounded FIFO queue. Loop thread only."""

    def __init__(self, *, max_streams: int, max_streams_per_model: int, max_queued: int) -> None:
        self.max_streams = max_streams
        self.max_streams_per_model = max_streams_per_model
        self.max_queued = max_queued
        self._running: collections.Counter[str] = collections.Counter()
        self._total = 0
        self._waiting: collections.deque[_Waiter] = collections.deque()
        self._closed = False

    def view(self) -> AdmissionView:
        return AdmissionView(running=self._total, queued=len(self._waiting))

    def close(self) -> None:
        """End every waiter, and refuse every later stream, with `ShuttingDown`. Idempotent.

        Streams running keep their slots until they end.
        """
        self._closed = True
        for waiter in self._waiting:
            if not waiter.admitted.done():
                waiter.admitted.set_exception(ShuttingDown("the server is shutting down"))
        self._waiting.clear()

    @contextlib.asynccontextmanager
    async def admit(self, model: str) -> AsyncIterator[None]:
        """Hold a stream slot for `model` for the body of the `async with`.

        Waits in the queue when every slot it could use is taken; raises
        `Overloaded` when the queue is full too, `ShuttingDown` once closed.
        """
        await self._acquire(model)
        try:
            yield
        finally:
            self._release(model)

    def _fits(self, model: str) -> bool:
        return self._total < self.max_streams and self._running[model] < self.max_streams_per_model

    def _take(self, model: str) -> None:
        self._running[model] += 1
        self._total += 1

    async def _acquire(self, model: str) -> None:
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        # Whoever waits, waits for a full model or a full server (`_dispatch`
        # leaves nobody waiting who fits): if this one fits, it is next.
        if self._fits(model):
            self._take(model)
            return
        if len(self._waiting) >= self.max_queued:
            raise Overloaded(
                f"too many concurrent streams: {self._total} running (limit {self.max_streams}, "
                f"{self.max_streams_per_model} per model, {self._running[model]} on {model}) and "
                f"{len(self._waiting)} waiting (limit {self.max_queued}); retry later"
            )
        waiter = _Waiter(model, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        try:
            await waiter.admitted
        except BaseException:
            admitted = waiter.admitted
            if admitted.done() and not admitted.cancelled() and admitted.exception() is None:
                self._release(model)  # admitted, then cancelled before it could run: hand it on
            elif waiter in self._waiting:  # (`_dispatch` drops a cancelled waiter by itself)
                self._waiting.remove(waiter)
            raise

    def _release(self, model: str) -> None:
        self._running[model] -= 1
        if not self._running[model]:
            del self._running[model]
        self._total -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Admit waiters, oldest first, while slots allow; skip those whose model is full."""
        if not self._waiting:
            return
        kept: collections.deque[_Waiter] = collections.deque()
        while self._waiting and self._total < self.max_streams:
            waiter = self._waiting.popleft()
            if waiter.admitted.done():
                continue  # cancelled, its task not yet resumed to leave the queue
            if self._fits(waiter.model):
                self._take(waiter.model)
                waiter.admitted.set_result(None)
            else:
                kept.append(waiter)
        kept.extend(self._waiting)
        self._waiting = kept
