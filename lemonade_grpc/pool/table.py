"""The model table: which models are in the pool, and the one writer of their state, pin and options.

Every change of a model's `state`, `pinned` or `options` goes through
`ModelTable`, which checks the transition and publishes the event of the
change in the same step, so no change goes unseen (llama-swap's
`internal/process`: one writer, whose `setState` emits the event). No other
module assigns those fields: `tests/pool/test_table.py` reads the
package's source and fails if one does.

The table decides nothing: the loader, the stopper and the supervisor
decide, and call it to act. Every method returns without awaiting, so what
a caller checked just before calling still holds when the change is made.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

from lemonade_grpc.core.options import EffectiveOptions
from lemonade_grpc.pool.events import (
    EventBus,
    ModelLoaded,
    ModelStateChanged,
    ModelUnloaded,
    ModelUpdated,
    PinChanged,
    UnloadReason,
)
from lemonade_grpc.pool.model import Model, ModelState, is_valid_transition
from lemonade_grpc.pool.observer import PoolObserver
from lemonade_grpc.pool.views import model_view

log = logging.getLogger(__name__)


class ModelTable:
    """The models in the pool by name. Loop thread only.

    `settings_changed(model)` is called after a model's pin or options
    changed (the idle countdown depends on both).
    """

    def __init__(
        self, bus: EventBus, observer: PoolObserver, settings_changed: Callable[[Model], None]
    ) -> None:
        self._bus = bus
        self._observer = observer
        self._settings_changed = settings_changed
        self._models: dict[str, Model] = {}
        # Set while a model may be READY: what the memory check waits for.
        self.maybe_ready = asyncio.Event()

    # ------------------------------------------------------------- reads

    def get(self, name: str) -> Model | None:
        return self._models.get(name)

    def __iter__(self) -> Iterator[Model]:
        """The models now (a copy: the table may change while the caller goes through them)."""
        return iter(list(self._models.values()))

    def in_state(self, state: ModelState) -> list[Model]:
        return [m for m in self._models.values() if m.state is state]

    def ready(self, name: str) -> Model | None:
        """`name`'s model if it is READY."""
        model = self._models.get(name)
        return model if model is not None and model.state is ModelState.READY else None

    def awaiting_restart(self, name: str) -> Model | None:
        """`name`'s model if it is pinned and FAILED: crashed, its restart pending."""
        model = self._models.get(name)
        return model if model is not None and model.state is ModelState.FAILED and model.pinned else None

    def replaced(self, name: str) -> Model | None:
        """The entry of `name` a start replaces (stopped, reason RELOAD): a READY or FAILED one."""
        model = self._models.get(name)
        return model if model is not None and model.state in (ModelState.READY, ModelState.FAILED) else None

    def is_current(self, model: Model) -> bool:
        """Whether `model` is still the pool's entry for its name (not a replaced or stopped one)."""
        return self._models.get(model.name) is model

    # ------------------------------------------------------------ writes

    def enter(self, model: Model) -> None:
        """Put a new LOADING `model` in the pool (its name must be free) and say so."""
        assert model.state is ModelState.LOADING
        assert model.name not in self._models, f"{model.name} is already in the pool"
        self._models[model.name] = model
        log.debug("%s: loading", model.name)
        self._bus.publish(ModelStateChanged(model.name, ModelState.LOADING))

    def set_state(
        self, model: Model, state: ModelState, *, reason: UnloadReason | None = None, message: str = ""
    ) -> None:
        """The one place a model's state changes; publishes the event of the change.

        READY: ModelLoaded. A READY model's FAILED: ModelUnloaded (CRASHED).
        STOPPED: ModelUnloaded (`reason`), and the model leaves the pool.
        UNLOADING, and FAILED while loading: ModelStateChanged.
        """
        old = model.state
        if not is_valid_transition(old, state):
            raise AssertionError(f"{model.name}: invalid transition {old} -> {state}")
        model.state = state
        pid = model.backend.pid if model.backend is not None else 0
        why = f" ({reason.value})" if reason else ""
        log.debug("%s: %s -> %s%s", model.name, old.value, state.value, why)
        if state is ModelState.READY:
            self.maybe_ready.set()
            self._bus.publish(ModelLoaded(model_view(model)))
        elif state is ModelState.FAILED and old is ModelState.READY:
            model.crash_reported = True
            self._observer.unloaded(model.name, UnloadReason.CRASHED, pid, message)
            self._bus.publish(ModelUnloaded(model.name, UnloadReason.CRASHED, pid, message))
        elif state is ModelState.STOPPED:
            if self._models.get(model.name) is model:
                del self._models[model.name]
            if not model.crash_reported:
                self._observer.unloaded(model.name, reason or UnloadReason.REQUESTED, pid, message)
            self._bus.publish(ModelUnloaded(model.name, reason or UnloadReason.REQUESTED, pid, message))
        else:
            self._bus.publish(ModelStateChanged(model.name, state, reason, message))

    def set_pin(self, model: Model, pinned: bool | None) -> None:
        """Apply a tri-state pin (None keeps it); publish PinChanged when it changes."""
        if pinned is not None and pinned != model.pinned:
            model.pinned = pinned
            self._bus.publish(PinChanged(model.name, pinned))
            self._settings_changed(model)

    def set_options(self, model: Model, options: EffectiveOptions) -> None:
        """The one place a READY model's options change in place; publishes ModelUpdated.

        The event also ends, on Watch, the load that made the change (issue
        18 finding 11: such a load showed QUEUED and nothing after, and
        nothing said the options had changed).
        """
        model.options = options
        self._settings_changed(model)
        self._bus.publish(ModelUpdated(model_view(model)))
