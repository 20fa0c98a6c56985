"""A model's lifecycle: a handful of named states and the valid moves between them.

Only `Pool._set_state` changes `Model.state`; it checks `is_valid_transition`
and publishes the event, so no state changes unseen (the habit of
llama-swap's `internal/process`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.catalog import ModelSpec
from lemonade_grpc.pool.options import EffectiveOptions


class ModelState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


_TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    ModelState.LOADING: frozenset({ModelState.READY, ModelState.UNLOADING, ModelState.FAILED}),
    ModelState.READY: frozenset({ModelState.UNLOADING, ModelState.FAILED}),
    ModelState.UNLOADING: frozenset(),
    ModelState.FAILED: frozenset({ModelState.UNLOADING}),
}


def is_valid_transition(old: ModelState, new: ModelState) -> bool:
    """Whether a model may move from `old` to `new`. Pure."""
    return new in _TRANSITIONS[old]


@dataclass(eq=False)
class Model:
    """One model in the pool. Owned by the pool; read-only everywhere else.

    `generation` increases with every process started for this name, so a
    late event about an old process (its exit, say) can be told apart from
    one about the current process and dropped.
    """

    spec: ModelSpec
    options: EffectiveOptions
    state: ModelState
    generation: int
    pinned: bool = False
    backend: Backend | None = None
    loaded_at: float | None = None
    last_used_at: float | None = None
    leases: int = 0

    @property
    def name(self) -> str:
        return self.spec.name
