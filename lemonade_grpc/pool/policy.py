"""Pure decisions of the pool: reuse or reload, which models to evict, what survives a failure.

Nothing here logs, sleeps or touches a process: each function takes a view
of the pool and returns a plan, and the pool carries it out (the scheduler /
effects split of llama-swap's `internal/router/scheduler`). The pool asks
these functions and nothing else, so a decision is written once.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from lemonade_grpc.core.options import EffectiveOptions

K = TypeVar("K", bound=Hashable)


def reuses_process(running: EffectiveOptions, wanted: EffectiveOptions) -> bool:
    """Whether a READY model running with `running` serves a load that wants `wanted`.

    Only options baked into the process (context size, backend arguments)
    need a new one; the rest (idle timeout) change in place. A load for
    inference asks for nothing (`wanted` resolves to `running`), so it never
    reloads a model that is up (DESIGN.md item 2, Lemonade #1604).
    """
    return running.process_key() == wanted.process_key()


def changes_nothing(
    running: EffectiveOptions, running_pinned: bool, wanted: EffectiveOptions, pinned: bool | None
) -> bool:
    """Whether a load of a READY model would change nothing at all: the no-op, answered at once."""
    return running == wanted and (pinned is None or pinned == running_pinned)


@dataclass(frozen=True, slots=True)
class Resident:
    """What the policy needs to know about one model occupying a slot."""

    name: str
    pinned: bool
    in_flight: int
    last_used_at: float
    rss_bytes: int = 0
    type: Hashable = "llm"  # the slot pool it occupies


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


@dataclass(frozen=True, slots=True)
class Placement:
    """What a load must stop before it starts its process, in one decision.

    `reload`: the model's own running process (other options). Slot victims
    go with reason EVICTED_LRU, memory victims with MEMORY_PRESSURE.
    """

    reload: bool
    slot_victims: tuple[str, ...]
    memory_victims: tuple[str, ...]


def place_load(
    name: str,
    slot_type: Hashable,
    need: int,
    residents: Sequence[Resident],
    max_loaded: int,
    *,
    available: int,
    reserve: int,
) -> Placement | NoRoom | NotEnoughMemory:
    """Plan every stop a load of `name` needs (reload, slots, memory) before any is carried out.

    `residents` are the READY models (all types; `name` among them when it
    runs with other options and must be reloaded). A plan that cannot be
    carried out evicts nothing (`NoRoom`: pinned models fill the slots;
    `NotEnoughMemory`: even evicting every idle unpinned model would not
    free `need` bytes). A reload's old process counts as freed memory and
    frees its own slot, but is stopped only if the plan succeeds (issue #9
    finding 17: a reload that then failed INSUFFICIENT_MEMORY had already
    stopped the working model).
    """
    own = next((r for r in residents if r.name == name), None)
    others = [r for r in residents if r.name != name]
    slot = choose_victims([r for r in others if r.type == slot_type], max_loaded)
    if isinstance(slot, NoRoom):
        return slot
    freed = sum(r.rss_bytes for r in others if r.name in slot.victims) + (own.rss_bytes if own else 0)
    idle = [r for r in others if r.name not in slot.victims and r.in_flight == 0]
    memory = plan_memory(need, available, reserve, idle, freed=freed)
    if isinstance(memory, NotEnoughMemory):
        return memory
    return Placement(reload=own is not None, slot_victims=slot.victims, memory_victims=memory.victims)


@dataclass(frozen=True, slots=True)
class PressurePlan:
    """What memory pressure stops. `short`: even that leaves less than the reserve free."""

    victims: tuple[str, ...]
    short: NotEnoughMemory | None


def relieve_pressure(
    available: int, reserve: int, residents: Sequence[Resident], *, freeing: int = 0
) -> PressurePlan:
    """Plan the evictions that bring free memory back above `reserve`.

    `freeing` is what models already being stopped hold: it is about to be
    free, so it is not asked of anyone else (a victim still in its grace
    period is no longer a candidate, and the next check must not pick
    another in its place). Unpinned models go, idle before busy, least
    recently used first (busy ones too: an OOM kill would end their requests
    anyway). When even all of them would not be enough, all of them go and
    `short` says by how much.
    """
    plan = plan_memory(0, available + freeing, reserve, residents)
    if isinstance(plan, NotEnoughMemory):
        return PressurePlan(tuple(r.name for r in _eviction_order(residents)), plan)
    return PressurePlan(plan.victims, None)


def after_failed_load(
    *, cancelled: bool, ready: bool, pinned: bool, pin_in_force: bool, restart_pending: bool, restart: bool
) -> FailedLoadPlan:
    """What becomes of a model's pin when a load of it fails. Pure decision; must not log.

    `ready`: the model's entry is READY after the failure (the load failed
    before it stopped anything); `pinned`: its entry is pinned (a FAILED one:
    the load's own, or the crashed one it never replaced); `pin_in_force`:
    its pin held before this load began; `restart_pending`: a restart is
    scheduled already; `restart`: this load was that restart.

    A cancelled load says nothing about the model, and a READY model lost
    nothing: no change. A pin in force before the load is never ended by its
    failure, whoever asked for the load: only Pin and Unload unpin, and a
    restart's backoff gives up in the end (issue 18 finding 2: a Complete
    during a crashed pinned model's backoff cancelled the restart and, when
    its own load failed, dropped the pin for good). A pin that this load
    brought (a Load with `pinned = true`, a pin restored at boot) is dropped:
    a model that fails to load must not be retried at every boot (DESIGN.md
    item 5).
    """
    if cancelled or ready or (pinned and restart_pending):
        return FailedLoadPlan.KEEP
    if pinned and (pin_in_force or restart):
        return FailedLoadPlan.RESTART
    return FailedLoadPlan.UNPIN


class FailedLoadPlan(enum.Enum):
    """`after_failed_load`'s answer."""

    KEEP = "keep"  # pin and schedule as they are
    RESTART = "restart"  # keep the pin, schedule a restart (with backoff)
    UNPIN = "unpin"  # drop the pin, in memory and on disk


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
