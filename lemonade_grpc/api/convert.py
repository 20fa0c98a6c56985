"""Translation between protobuf messages and the pool's domain types. Pure."""

from __future__ import annotations

import time

from google.protobuf import timestamp_pb2

from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.core.catalog import Capabilities, ModelSpec, ModelType
from lemonade_grpc.core.options import EffectiveOptions, RequestedOptions
from lemonade_grpc.pool import events, forecast
from lemonade_grpc.pool.jobs import LoadResult
from lemonade_grpc.pool.model import ModelState, ModelView
from lemonade_grpc.pool.views import LoadView, PoolView

MODEL_TYPES = {ModelType.LLM: pb.MODEL_TYPE_LLM, ModelType.EMBEDDING: pb.MODEL_TYPE_EMBEDDING}
MODEL_STATES = {
    ModelState.LOADING: pb.MODEL_STATE_LOADING,
    ModelState.READY: pb.MODEL_STATE_READY,
    ModelState.UNLOADING: pb.MODEL_STATE_UNLOADING,
    ModelState.FAILED: pb.MODEL_STATE_FAILED,
    ModelState.STOPPED: pb.MODEL_STATE_UNSPECIFIED,  # never shown: a stopped model has left the pool
}
LOAD_PHASES = {
    events.LoadPhase.QUEUED: pb.LOAD_PHASE_QUEUED,
    events.LoadPhase.EVICTING: pb.LOAD_PHASE_EVICTING,
    events.LoadPhase.STARTING: pb.LOAD_PHASE_STARTING,
    events.LoadPhase.LOADING: pb.LOAD_PHASE_LOADING,
    events.LoadPhase.READY: pb.LOAD_PHASE_READY,
}
UNLOAD_REASONS = {
    events.UnloadReason.REQUESTED: pb.UNLOAD_REASON_REQUESTED,
    events.UnloadReason.EVICTED_LRU: pb.UNLOAD_REASON_EVICTED_LRU,
    events.UnloadReason.IDLE: pb.UNLOAD_REASON_IDLE,
    events.UnloadReason.MEMORY_PRESSURE: pb.UNLOAD_REASON_MEMORY_PRESSURE,
    events.UnloadReason.CRASHED: pb.UNLOAD_REASON_CRASHED,
    events.UnloadReason.SHUTDOWN: pb.UNLOAD_REASON_SHUTDOWN,
    events.UnloadReason.RELOAD: pb.UNLOAD_REASON_RELOAD,
}


# What a google.protobuf.Timestamp can hold: 0001-01-01 to 9999-12-31.
_TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)


def timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp for epoch `seconds`; None stays None (the field is left unset).

    Clamped to what a Timestamp can hold: a status must never fail to
    serialise (issue #9 finding 4 made every Status answer UNKNOWN "Timestamp
    is not valid"; the bounds on options are the fix, this is the backstop).
    """
    if seconds is None:
        return None
    low, high = _TIMESTAMP_SECONDS
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(min(max(seconds, low), high) * 1e9))
    return stamp


def requested_options(options: pb.LoadOptions, has_options: bool) -> RequestedOptions:
    """A request's options with presence kept: an absent field becomes None."""
    if not has_options:
        return RequestedOptions()
    return RequestedOptions(
        ctx_size=options.ctx_size if options.HasField("ctx_size") else None,
        idle_unload_seconds=options.idle_unload_seconds if options.HasField("idle_unload_seconds") else None,
        backend_args=tuple(options.backend_args.args) if options.HasField("backend_args") else None,
    )


def load_options(options: EffectiveOptions, server_idle_default: int) -> pb.LoadOptions:
    """Effective options with every field present (the server default filled in)."""
    return pb.LoadOptions(
        ctx_size=options.ctx_size,
        idle_unload_seconds=options.idle_seconds(server_idle_default),
        backend_args=pb.BackendArgs(args=options.backend_args),
    )


def model_status(view: ModelView, server_idle_default: int) -> pb.ModelStatus:
    return pb.ModelStatus(
        name=view.name,
        type=MODEL_TYPES[view.type],
        state=MODEL_STATES[view.state],
        pinned=view.pinned,
        options=load_options(view.options, server_idle_default),
        pid=view.pid,
        loaded_at=timestamp(view.loaded_at),
        last_used_at=timestamp(view.last_used_at),
        in_flight=view.in_flight,
        idle_unload_at=timestamp(view.idle_unload_at),
        rss_bytes=view.rss_bytes,
        recipe=view.recipe,
        port=view.port,
        capabilities=capabilities_message(view.capabilities),
    )


def load_response(progress: events.LoadProgress) -> pb.LoadResponse:
    return pb.LoadResponse(
        model=progress.model,
        phase=LOAD_PHASES[progress.phase],
        fraction=progress.fraction,
        message=progress.message,
        queue_position=progress.queue_position,
        evicted=progress.evicted,
    )


def load_ready(result: LoadResult, server_idle_default: int) -> pb.LoadResponse:
    return pb.LoadResponse(
        model=result.model.name,
        phase=pb.LOAD_PHASE_READY,
        fraction=1.0,
        message="already loaded" if result.already_loaded else "ready",
        already_loaded=result.already_loaded,
        evicted=result.evicted,
        status=model_status(result.model, server_idle_default),
    )


def _load_in_flight(view: LoadView) -> pb.LoadInFlight:
    return pb.LoadInFlight(
        model=view.model,
        phase=LOAD_PHASES[view.phase],
        fraction=view.fraction,
        started_at=timestamp(view.started_at),
        waiters=view.waiters,
    )


def pool_status(view: PoolView, server_idle_default: int) -> pb.PoolStatus:
    return pb.PoolStatus(
        models=[model_status(m, server_idle_default) for m in view.models],
        slots=[
            pb.SlotUsage(type=MODEL_TYPES[s.type], max_loaded=s.max_loaded, used=s.used, pinned=s.pinned)
            for s in view.slots
        ],
        memory=pb.MemoryStatus(
            total_bytes=view.memory.total_bytes,
            available_bytes=view.memory.available_bytes,
            backends_rss_bytes=view.memory.backends_rss_bytes,
        ),
        load_in_flight=_load_in_flight(view.load_in_flight) if view.load_in_flight else None,
        queue=[_load_in_flight(q) for q in view.queue],
        sequence=view.sequence,
        backends_started=view.backends_started,
        streams_running=view.streams_running,
        streams_queued=view.streams_queued,
    )


def snapshot(view: PoolView, server_idle_default: int, *, resync: bool) -> pb.WatchResponse:
    """A Watch message carrying the whole pool, numbered as the last event it reflects."""
    return pb.WatchResponse(
        sequence=view.sequence,
        time=timestamp(time.time()),
        resync=resync,
        snapshot=pool_status(view, server_idle_default),
    )


def watch_event(envelope: events.Envelope, server_idle_default: int) -> pb.WatchResponse:
    """A Watch message for one pool event."""
    response = pb.WatchResponse(sequence=envelope.sequence, time=timestamp(envelope.time))
    event = envelope.event
    if isinstance(event, events.LoadProgress):
        response.load_progress.CopyFrom(
            pb.LoadProgress(
                model=event.model,
                phase=LOAD_PHASES[event.phase],
                fraction=event.fraction,
                message=event.message,
            )
        )
    elif isinstance(event, events.ModelLoaded):
        response.model_loaded.status.CopyFrom(model_status(event.model, server_idle_default))
    elif isinstance(event, events.ModelUpdated):
        response.model_updated.status.CopyFrom(model_status(event.model, server_idle_default))
    elif isinstance(event, events.ModelUnloaded):
        response.model_unloaded.CopyFrom(
            pb.ModelUnloaded(
                model=event.model, reason=UNLOAD_REASONS[event.reason], pid=event.pid, message=event.message
            )
        )
    elif isinstance(event, events.PinChanged):
        response.pin_changed.CopyFrom(pb.PinChanged(model=event.model, pinned=event.pinned))
    elif isinstance(event, events.ModelStateChanged):
        response.model_state_changed.CopyFrom(
            pb.ModelStateChanged(
                model=event.model,
                state=MODEL_STATES[event.state],
                reason=UNLOAD_REASONS[event.reason] if event.reason else pb.UNLOAD_REASON_UNSPECIFIED,
                message=event.message,
            )
        )
    elif isinstance(event, events.LoadFailed):
        response.load_failed.CopyFrom(
            pb.LoadFailed(model=event.model, reason=event.reason, message=event.message)
        )
    else:
        response.warning.CopyFrom(pb.Warning(code=event.code, message=event.message, models=event.models))
    return response


class WatchMessages:
    """The Watch message of each recent event, built once and shared by every subscriber.

    With a thousand Watch streams, building the same message a thousand
    times was a third of our own share of the fan-out's CPU (issue 13).
    Keeps the last `size` events' messages; an older one (a subscriber far
    behind) is built again. The messages are shared: never modify one.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._messages: dict[tuple[int, int], pb.WatchResponse] = {}
        self.built = 0  # how many messages were built: the tests' measure of sharing

    def get(self, envelope: events.Envelope, server_idle_default: int) -> pb.WatchResponse:
        """`watch_event(envelope, server_idle_default)`, built at most once while it is recent."""
        key = (envelope.sequence, server_idle_default)
        message = self._messages.get(key)
        if message is None:
            message = watch_event(envelope, server_idle_default)
            self.built += 1
            if len(self._messages) >= self._size:
                del self._messages[next(iter(self._messages))]  # the oldest: dicts keep insertion order
            self._messages[key] = message
        return message


def catalog_model(spec: ModelSpec, view: ModelView | None, server_idle_default: int) -> pb.CatalogModel:
    return pb.CatalogModel(
        name=spec.name,
        type=MODEL_TYPES[spec.type],
        recipe=spec.recipe.value,
        path=str(spec.path),
        default_options=load_options(spec.defaults, server_idle_default),
        loaded=view is not None,
        pinned=view.pinned if view else False,
        state=MODEL_STATES[view.state] if view else pb.MODEL_STATE_UNSPECIFIED,
        capabilities=capabilities_message(spec.capabilities),
    )


def capabilities_message(capabilities: Capabilities) -> pb.Capabilities:
    return pb.Capabilities(
        chat_template=capabilities.chat_template,
        tools=capabilities.tools,
        embedding=capabilities.embedding,
        embedding_dimension=capabilities.embedding_dimension,
        rerank=capabilities.rerank,
        context_length=capabilities.context_length,
        vision=capabilities.vision,
    )


PLAN_OUTCOMES = {
    forecast.Outcome.ALREADY_LOADED: pb.PLAN_OUTCOME_ALREADY_LOADED,
    forecast.Outcome.REUSE: pb.PLAN_OUTCOME_REUSE,
    forecast.Outcome.LOAD: pb.PLAN_OUTCOME_LOAD,
    forecast.Outcome.SLOTS_PINNED: pb.PLAN_OUTCOME_SLOTS_PINNED,
    forecast.Outcome.INSUFFICIENT_MEMORY: pb.PLAN_OUTCOME_INSUFFICIENT_MEMORY,
}


def plan_response(told: forecast.LoadForecast, server_idle_default: int) -> pb.PlanResponse:
    """What a Load would do, as the Plan RPC answers it."""
    return pb.PlanResponse(
        model=told.model,
        outcome=PLAN_OUTCOMES[told.outcome],
        options=load_options(told.options, server_idle_default),
        reload=told.reload,
        evictions=[pb.Eviction(model=name, reason=UNLOAD_REASONS[reason]) for name, reason in told.evictions],
        need_bytes=told.need_bytes,
        available_bytes=told.available_bytes,
        reserve_bytes=told.reserve_bytes,
        loads_ahead=told.loads_ahead,
        message=told.message,
    )
