"""What the pool tells whoever observes it: telemetry's hooks, no-ops here.

The pool calls these at the moments only it can see (a load's phase
changes, how each load ended, each stop with its reason, each restart of a
crashed model) and knows nothing of what is done with them: traces,
metrics and log lines are `lemonade_grpc.telemetry`'s business. Every hook
is called on the event loop's thread, synchronously, and must not raise or
block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from lemonade_grpc.pool.events import LoadPhase, UnloadReason

if TYPE_CHECKING:
    from lemonade_grpc.core.errors import LemonadeError
    from lemonade_grpc.pool.jobs import LoadJob, LoadResult

Attributes = Mapping[str, str | int | bool | float]


class PoolObserver:
    """Hooks the pool calls; this base does nothing with them."""

    def load_phase(self, job: LoadJob, phase: LoadPhase, attributes: Attributes) -> None:
        """`job` entered `phase` (QUEUED first, from the requester's own context)."""

    def load_ended(self, job: LoadJob, result: LoadResult | None, error: LemonadeError | None) -> None:
        """`job` ended with `result` or `error` (exactly one is set). Once per job."""

    def unloaded(self, name: str, reason: UnloadReason, pid: int, message: str) -> None:
        """A model left the pool (or, for CRASHED, its process died and it is FAILED)."""

    def restarting(self, name: str) -> None:
        """A crashed pinned model is being loaded again."""
