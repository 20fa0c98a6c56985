"""The pinned models and their options, kept in memory and on disk (DESIGN.md item 5).

The pool says which models are pinned (`keep`, `drop`); this module writes
the state file in the background, one write at a time, the latest state
winning, off the event loop (issue #9 finding 20: fsync ran on the loop).
`flush` waits until what is on disk is what is in memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from lemonade_grpc.core import options as opts
from lemonade_grpc.core.catalog import ModelSpec, ModelType
from lemonade_grpc.core.errors import LemonadeError
from lemonade_grpc.core.options import EffectiveOptions
from lemonade_grpc.core.tasks import TaskOwner, settle
from lemonade_grpc.pool import policy
from lemonade_grpc.store.pin_file import PinFile

log = logging.getLogger(__name__)


class Pins:
    """Pinned model names and their options, in the order they were pinned. Loop thread only.

    `on_write_failed(message)` is called when the file cannot be written; the
    pins stay as they are in memory and the next change tries again.
    """

    def __init__(
        self, store: PinFile | None, owner: TaskOwner, on_write_failed: Callable[[str], None]
    ) -> None:
        self._store = store
        self._owner = owner
        self._on_write_failed = on_write_failed
        self._pins: dict[str, EffectiveOptions] = {}
        self._written: dict[str, EffectiveOptions] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._failure: str | None = None

    def __contains__(self, name: object) -> bool:
        return name in self._pins

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._pins))

    def items(self) -> list[tuple[str, EffectiveOptions]]:
        return list(self._pins.items())

    def read_saved(self) -> tuple[dict[str, EffectiveOptions], str | None]:
        """What the previous run saved, and a problem if the file could not be used (see `PinFile.read`).

        Marks it as what is on disk, so restoring it writes nothing until it changes.
        """
        if self._store is None:
            return {}, None
        saved, problem = self._store.read()
        self._written = dict(saved) if problem is None else None
        return saved, problem

    def keep(self, name: str, options: EffectiveOptions) -> None:
        """Pin `name` with `options` (a model pinned again keeps its place in the order)."""
        self._pins[name] = options
        self._save()

    def drop(self, *names: str) -> None:
        """Unpin `names`; unknown names are ignored. One write however many."""
        for name in names:
            self._pins.pop(name, None)
        self._save()

    def _save(self) -> None:
        if self._store is None or self._pins == self._written:
            return
        if self._writer is None or self._writer.done():
            self._writer = self._owner.spawn(self._write_until_current(self._store), "save pins")

    async def _write_until_current(self, store: PinFile) -> None:
        # Writes run one at a time; a change made while one runs is picked up
        # by the next iteration, so the last state always reaches the disk.
        while self._pins != self._written:
            pins = dict(self._pins)
            try:
                await asyncio.to_thread(store.write, pins)
            except OSError as error:
                self._failure = f"cannot save pins to {store.path}: {error}"
                log.error("pins: %s", self._failure)
                self._on_write_failed(self._failure)
                return
            self._written, self._failure = pins, None

    async def flush(self) -> str | None:
        """Wait until the pins in memory are on disk; return why not when the write failed.

        Cancelling the caller does not cancel the write.
        """
        if self._writer is not None and not self._writer.done():
            await settle(self._writer)
        return self._failure if self._pins != self._written and self._store is not None else None


@dataclass(frozen=True, slots=True)
class RestorePlan:
    """Which saved pins to load again at boot, in pin order, and why the others are dropped."""

    restore: list[str]
    dropped: dict[str, str]


def plan_restore(
    saved: Mapping[str, EffectiveOptions],
    catalog: Mapping[str, ModelSpec],
    max_loaded: Mapping[ModelType, int],
) -> RestorePlan:
    """Split saved pins into those to restore and those to drop, with the reason. Pure.

    A pin is dropped when its model left the catalog, when the config no
    longer accepts its options (its backend flags are no longer allowed,
    say: a saved pin must never stop the server from starting, issue #9
    finding 18), or when the slots are full of earlier pins. Checked in
    that order, so a pin that could not be restored never takes a slot.
    """
    dropped: dict[str, str] = {}
    candidates: list[tuple[str, ModelType]] = []
    for name, options in saved.items():
        spec = catalog.get(name)
        if spec is None:
            dropped[name] = "not in the catalog"
            continue
        try:
            opts.validate(opts.requesting(options), name, spec.allowed_args)
        except LemonadeError as error:
            dropped[name] = f"its options are no longer accepted ({error.message})"
            continue
        candidates.append((name, spec.type))
    restore, left_out = policy.fit_pins(candidates, max_loaded)
    for name in left_out:
        slot_type = catalog[name].type
        dropped[name] = f"no free {slot_type.value} slot (max_loaded {max_loaded.get(slot_type, 1)})"
    return RestorePlan(restore, dropped)
