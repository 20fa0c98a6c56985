"""What a load would do, told without doing it (`Pool.plan`, the Plan RPC).

Decided by the same functions the load runs (`policy.changes_nothing`,
`policy.reuses_process`, `policy.place_load`, through `Loader._placement`),
and a failure is told with the very message the load would fail with: the
two cannot disagree.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lemonade_grpc.core.options import EffectiveOptions
from lemonade_grpc.pool.events import UnloadReason


class Outcome(enum.Enum):
    ALREADY_LOADED = "already_loaded"
    REUSE = "reuse"
    LOAD = "load"
    SLOTS_PINNED = "slots_pinned"
    INSUFFICIENT_MEMORY = "insufficient_memory"


@dataclass(frozen=True, slots=True)
class LoadForecast:
    """What `Pool.load` would do now with the same arguments."""

    model: str
    outcome: Outcome
    options: EffectiveOptions
    message: str
    reload: bool = False
    evictions: tuple[tuple[str, UnloadReason], ...] = ()
    need_bytes: int = 0
    available_bytes: int = 0
    reserve_bytes: int = 0
    loads_ahead: int = 0
