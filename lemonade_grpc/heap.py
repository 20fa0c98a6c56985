"""Giving the memory the server has freed back to the system.

glibc keeps what a process frees inside its heaps: a burst of large
requests leaves the server's RSS at its peak long after the requests are
gone (issue 18 finding 3: 300 Health Watch calls naming a 3 MiB service,
each refused at once, left the server at 984 MiB against 48 at rest; gRPC's
core assembles a message from many small slices, which fragment the heaps,
so neither `M_MMAP_THRESHOLD` nor `M_TRIM_THRESHOLD` helps: only
`malloc_trim(0)` gives back the free pages inside them, 984 -> 214 MiB).

`HeapTrimmer` reads the server's RSS every `interval` seconds (one read of
`/proc/self/statm`) and calls `malloc_trim(0)`, in a worker thread (a trim
over a heap fragmented to 326 MiB took 11-24 ms here, over the server's
usual one 0.05 ms), when the RSS has grown more than `growth` bytes since
the last trim left it. Small growth counts too (issue 18 finding 15): under churn
the main heap fragments slowly, +0.5 MiB over a 29-minute soak's second
half, which only a trim gives back. An idle server does not grow and is
never trimmed; one whose RSS stays high for real is trimmed once, not every
interval. With another C library (no `malloc_trim`) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 30.0
GROWTH_BYTES = 1 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")


def own_rss() -> int:
    """This process's resident set size, in bytes."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


def malloc_trim() -> Callable[[], object] | None:
    """glibc's `malloc_trim(0)`, or None when the C library has none."""
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return lambda: function(0)


def should_trim(rss: int, floor: int, growth: int) -> bool:
    """Whether `rss` is far enough above `floor` (what the last trim left, or the start) to trim. Pure."""
    return rss > floor + growth


class HeapTrimmer:
    """Gives freed heap memory back to the system when the RSS has grown; `run` until cancelled."""

    def __init__(
        self,
        *,
        interval: float = INTERVAL_SECONDS,
        growth: int = GROWTH_BYTES,
        rss: Callable[[], int] = own_rss,
        trim: Callable[[], object] | None = None,
    ) -> None:
        self.interval = interval
        self.growth = growth
        self._rss = rss
        self._trim = trim if trim is not None else malloc_trim()
        self.trims = 0
        self.checks = 0

    async def run(self) -> None:
        if self._trim is None:
            return
        floor = self._rss()
        while True:
            await asyncio.sleep(self.interval)
            before = self._rss()
            self.checks += 1
            if not should_trim(before, floor, self.growth):
                continue
            await asyncio.to_thread(self._trim)
            after = self._rss()
            self.trims += 1
            # What this trim left: what stays (many streams, CPython's own arenas) is not
            # trimmed again until it grows once more.
            floor = after
            log.debug("heap: RSS %d MiB -> %d MiB after malloc_trim", before >> 20, after >> 20)
