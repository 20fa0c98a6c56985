"""Background work that belongs to the server, not to the request that started it.

A client's cancellation or deadline can land at any `await` of its handler
(DESIGN.md lesson 9). Work that must not be cut half-way (stopping a
backend, a load, a state write) runs in a task owned by a `TaskOwner`; the
handler only waits for it, with `settle` when it must not return before the
work ends even if it is cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


async def settle(work: asyncio.Future[T]) -> T:
    """Wait for `work` to end even if the caller is cancelled meanwhile; then re-raise that cancellation.

    For cleanup that must finish before the caller goes on (a lock holder
    that stopped a backend must not release the lock while the process still
    runs). `work` itself is never cancelled by the caller's cancellation; if
    `work` is cancelled by someone else, that CancelledError is raised.
    """
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(work)
        except asyncio.CancelledError:
            if work.done():
                raise  # `work` itself was cancelled
            cancelled = True
            continue
        except BaseException:
            if cancelled:
                raise asyncio.CancelledError from None
            raise
        if cancelled:
            raise asyncio.CancelledError
        return result


async def wait_for_any(events: list[asyncio.Event], seconds: float) -> None:
    """Return when one of `events` is set or `seconds` have passed, whichever comes first."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class TaskOwner:
    """Owns background tasks: keeps a reference, reads every exception, cancels on close.

    A task that fails is logged with its traceback at once (an exception no
    one reads is a watcher dying silently). `spawn` after `close` raises
    RuntimeError. Loop thread only.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(self, work: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """Run `work` in the background, in a context of its own; its failure is logged, `close` cancels it.

        A fresh context, not a copy of the caller's: the work is the owner's,
        not the request's that happened to start it. A copy carried the
        request's trace into everything the task started in turn (a crash
        watcher, its restart, their log lines: issue 11).
        """
        if self._closed:
            work.close()
            raise RuntimeError(f"{self._name}: closed, cannot start {name}")
        task = asyncio.create_task(work, name=name, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()  # read: never "exception was never retrieved"
        if error is not None:
            log.error("%s: background task %r failed", self._name, task.get_name(), exc_info=error)

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task and wait until all have ended. Idempotent."""
        self._closed = True
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
