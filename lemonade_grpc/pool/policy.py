"""Pure decisions of the pool: which models to evict to make room.

Nothing here logs, sleeps or touches a process: each function takes a view
of the pool and returns a plan, and the pool carries it out (the scheduler /
effects split of llama-swap's `internal/router/scheduler`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Resident:
    """What the policy needs to know about one model occupying a slot."""

    name: str
    pinned: bool
    in_flight: int
    last_used_at: float
    rss_bytes: int = 0


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    """Models to stop, in order, so that a new model fits. Empty: it fits already."""

    victims: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NoRoom:
    """Every slot is held by a pinned model: nothing may be evicted."""

    pinned: tuple[str, ...]


def choose_victims(residents: Sequence[Resident], max_loaded: int) -> EvictionPlan | NoRoom:
    """Plan the evictions that leave a free slot among `residents` (one slot type).

    Least recently used first, idle models before busy ones; pinned models are
    never chosen (Lemonade #2226). Returns `NoRoom` when the pinned models alone
    fill the slots, in which case nothing must be evicted at all.
    """
    excess = len(residents) - max_loaded + 1
    if excess <= 0:
        return EvictionPlan(())
    candidates = _eviction_order(residents)
    if len(candidates) < excess:
        return NoRoom(tuple(sorted(r.name for r in residents if r.pinned)))
    return EvictionPlan(tuple(r.name for r in candidates[:excess]))


def _eviction_order(residents: Sequence[Resident]) -> list[Resident]:
    """Unpinned residents, first to go first: idle before busy, then least recently used."""
    return sorted(
        (r for r in residents if not r.pinned),
        key=lambda r: (r.in_flight > 0, r.last_used_at, r.name),
    )


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Models to stop so that `need` bytes fit above the reserve. Empty: it fits already."""

    victims: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NotEnoughMemory:
    """`need` does not fit even if every candidate were stopped; the figures say why."""

    need: int
    available: int
    reserve: int
    freeable: int


def plan_memory(
    need: int,
    available: int,
    reserve: int,
    candidates: Sequence[Resident],
    *,
    freed: int = 0,
) -> MemoryPlan | NotEnoughMemory:
    """Plan the evictions that leave `need` bytes free above `reserve`.

    `available` is what the host has now and `freed` what evictions already
    planned will give back; each candidate gives back its `rss_bytes`. The
    caller chooses the candidates (a load takes only idle ones; memory
    pressure takes busy ones too, after the idle); pinned ones are never
    chosen. `need = 0` asks only that the reserve be restored.
    """
    room = available + freed - reserve
    victims: list[str] = []
    for resident in _eviction_order(candidates):
        if need <= room:
            break
        victims.append(resident.name)
        room += resident.rss_bytes
    if need <= room:
        return MemoryPlan(tuple(victims))
    freeable = sum(r.rss_bytes for r in candidates if not r.pinned)
    return NotEnoughMemory(need=need, available=available + freed, reserve=reserve, freeable=freeable)


def fit_pins(pins: Sequence[tuple[str, K]], max_loaded: Mapping[K, int]) -> tuple[list[str], list[str]]:
    """Split pinned models (in the order they were pinned) into those that fit their slots and the rest.

    Used at boot: when the configuration now has fewer slots than there are
    saved pins, the first pinned win. Returns `(fit, left_out)`.
    """
    used: dict[K, int] = {}
    fit: list[str] = []
    left_out: list[str] = []
    for name, slot_type in pins:
        if used.get(slot_type, 0) < max_loaded.get(slot_type, 1):
            used[slot_type] = used.get(slot_type, 0) + 1
            fit.append(name)
        else:
            left_out.append(name)
    return fit, left_out


def restart_delay(
    crashes: Sequence[float],
    now: float,
    *,
    base: float,
    cap: float,
    max_restarts: int,
    window: float,
) -> float | None:
    """Seconds to wait before restarting a crashed model, or None to give up.

    `crashes` are the times it crashed (the latest included). The delay
    doubles with each crash within `window` seconds: base, 2 base, 4 base,
    ... up to `cap`. More than `max_restarts` crashes within the window
    means it keeps crashing: stop restarting it.
    """
    recent = sum(1 for t in crashes if now - t <= window)
    if recent > max_restarts:
        return None
    return float(min(cap, base * 2 ** max(0, recent - 1)))
