"""The stream interval: when a fast stream's next read may happen, and the clock it is measured by."""

from __future__ import annotations

import asyncio
import time

from lemonade_grpc.backends.chunks import Chunk
from lemonade_grpc.backends.http import Exchange


class Pacer:
    """When a stream's next read may happen: at most one batch per `interval` once deltas come faster.

    `max_tokens`: the request's limit, after which only the end of the
    stream is left to read (never waited for).
    """

    __slots__ = ("_interval", "_last", "_left")

    def __init__(self, interval: float, max_tokens: object) -> None:
        self._interval = interval
        self._left = max_tokens if type(max_tokens) is int else -1  # -1: no limit
        self._last = -interval  # when the previous batch with text was taken

    def hold_until(self, batch: list[Chunk], now: float) -> float:
        """The time (`now`'s clock) before which the read after `batch` should wait; 0.0: read at once."""
        texts = sum(1 for chunk in batch if chunk.has_delta)
        if not texts:
            return 0.0
        previous, self._last = self._last, now
        if self._left >= 0:
            self._left = max(0, self._left - texts)
        fast = texts > 1 or now - previous < self._interval
        if not fast or self._left == 0 or any(chunk.is_last for chunk in batch):
            return 0.0
        return now + self._interval


class PacingClock:
    """The time the stream interval is measured in: `now` (time.monotonic) and `sleep` (asyncio's).

    A dependency of `OpenAIClient` so that a test can step time instead of
    waiting for it (issue 18 finding 12: a pacing test failed 2 runs in 5).
    """

    now = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def hold(exchange: Exchange, until: float, clock: PacingClock) -> None:
    """Keep the held connection unread until `until` (`clock.now()`); read it again even if cancelled."""
    try:
        delay = until - clock.now()
        if delay > 0:
            await clock.sleep(delay)
    finally:
        exchange.hold(False)
