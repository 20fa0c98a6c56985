"""Pure decisions of the pool: which models to evict to make room.

Nothing here logs, sleeps or touches a process: each function takes a view
of the pool and returns a plan, and the pool carries it out (the scheduler /
effects split of llama-swap's `internal/router/scheduler`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Resident:
    """What the policy needs to know about one model occupying a slot."""

    name: str
    pinned: bool
    in_flight: int
    last_used_at: float


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
    candidates = sorted(
        (r for r in residents if not r.pinned),
        key=lambda r: (r.in_flight > 0, r.last_used_at, r.name),
    )
    if len(candidates) < excess:
        return NoRoom(tuple(sorted(r.name for r in residents if r.pinned)))
    return EvictionPlan(tuple(r.name for r in candidates[:excess]))
