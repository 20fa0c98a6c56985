"""How much memory the host has, behind an interface tests can replace.

The pool asks a `MemoryProbe` before each load and periodically (memory
pressure). The real probe is psutil's `virtual_memory()`; tests inject one
whose figures they set.
"""

from __future__ import annotations

from typing import Protocol

import psutil

MIB = 1 << 20


class MemoryProbe(Protocol):
    def total_bytes(self) -> int:
        """Physical memory of the host."""
        ...

    def available_bytes(self) -> int:
        """Memory a new process could use without swapping."""
        ...


class SystemMemory:
    """The host's memory as psutil reports it."""

    def total_bytes(self) -> int:
        return int(psutil.virtual_memory().total)

    def available_bytes(self) -> int:
        return int(psutil.virtual_memory().available)


def mib(size: int) -> str:
    """`size` bytes in MiB, for messages."""
    return f"{size / MIB:,.0f} MiB"
