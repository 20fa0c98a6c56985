"""The pool's hooks made into spans, metrics and one log line per load, unload and crash.

A load is one span, `load <model>`, child of the request that started it
(the Load or inference RPC; a root span for a restart or a restored pin),
with one child span per phase: `queued`, `evicting`, `starting`, `loading`.
Attributes name the model, who asked (`lemonade.origin`), the options asked
for, the evicted models and why, the backend's pid; a failed load's span
has status ERROR and `lemonade.reason`. Requests that join a load already
under way get no second load span (their RPC spans show the wait).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from opentelemetry import trace

from lemonade_grpc.core.errors import LemonadeError
from lemonade_grpc.pool.events import LoadPhase, UnloadReason
from lemonade_grpc.pool.jobs import LoadJob, LoadResult
from lemonade_grpc.pool.observer import Attributes, PoolObserver
from lemonade_grpc.telemetry.metrics import Instruments

log = logging.getLogger("lemonade_grpc.pool")


@dataclass(slots=True)
class _Load:
    span: trace.Span
    phase: LoadPhase
    phase_span: trace.Span
    phase_started: float
    started: float


def _requested(job: LoadJob) -> dict[str, int]:
    """The options a load asked for, as span attributes (of client backend args, only their number)."""
    requested = job.requested
    attributes: dict[str, int] = {}
    if requested.ctx_size is not None:
        attributes["lemonade.options.ctx_size"] = requested.ctx_size
    if requested.idle_unload_seconds is not None:
        attributes["lemonade.options.idle_unload_seconds"] = requested.idle_unload_seconds
    if requested.backend_args:
        attributes["lemonade.options.backend_args"] = len(requested.backend_args)
    return attributes


Hook = TypeVar("Hook", bound=Callable[..., None])


def _never_raises(hook: Hook) -> Hook:
    """`hook`, logging instead of raising: the pool calls it in the middle of its own work."""

    @functools.wraps(hook)
    def guarded(*args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            log.exception("telemetry: %s failed (ignored)", hook.__name__)

    return cast(Hook, guarded)


class PoolTelemetry(PoolObserver):
    """Spans (with `tracer`), metrics (with `instruments`) and log lines for the pool's events."""

    def __init__(self, tracer: trace.Tracer, instruments: Instruments | None) -> None:
        self._tracer = tracer
        self._instruments = instruments
        self._loads: dict[LoadJob, _Load] = {}

    @_never_raises
    def load_phase(self, job: LoadJob, phase: LoadPhase, attributes: Attributes) -> None:
        now = time.perf_counter()
        load = self._loads.get(job)
        if load is None:
            span = self._tracer.start_span(
                f"load {job.name}",
                attributes={
                    "lemonade.model": job.name,
                    "lemonade.origin": job.origin.value,
                    **({"lemonade.pinned": job.pinned} if job.pinned is not None else {}),
                    **_requested(job),
                },
            )
            self._loads[job] = _Load(span, phase, self._phase_span(span, phase, attributes), now, now)
            return
        if "lemonade.pid" in attributes:  # the process serving it (a port retry starts another)
            load.span.set_attribute("lemonade.pid", attributes["lemonade.pid"])
        if phase is load.phase:
            load.phase_span.add_event(phase.name.lower(), dict(attributes))
            return
        self._end_phase(job, load, now)
        load.phase, load.phase_started = phase, now
        load.phase_span = self._phase_span(load.span, phase, attributes)

    def _phase_span(self, parent: trace.Span, phase: LoadPhase, attributes: Attributes) -> trace.Span:
        return self._tracer.start_span(
            phase.name.lower(), context=trace.set_span_in_context(parent), attributes=dict(attributes)
        )

    def _end_phase(self, job: LoadJob, load: _Load, now: float) -> None:
        load.phase_span.end()
        if self._instruments is not None:
            self._instruments.load_phase_duration.record(
                now - load.phase_started, {"model": job.name, "phase": load.phase.name.lower()}
            )

    @_never_raises
    def load_ended(self, job: LoadJob, result: LoadResult | None, error: LemonadeError | None) -> None:
        if result is not None:
            outcome = "already_loaded" if result.already_loaded else "loaded"
        else:
            assert error is not None
            outcome = error.reason
        if self._instruments is not None:
            self._instruments.loads.add(1, {"model": job.name, "outcome": outcome})
        load = self._loads.pop(job, None)
        if load is None:
            # Answered at once (nothing to do): no phases, no line at INFO.
            log.debug("%s: already loaded", job.name)
            return
        now = time.perf_counter()
        self._end_phase(job, load, now)
        seconds = now - load.started
        fields_ = {"event": "load", "model": job.name, "outcome": outcome, "seconds": round(seconds, 3)}
        with trace.use_span(load.span, end_on_exit=True):
            load.span.set_attribute("lemonade.outcome", outcome)
            if error is not None:
                load.span.set_attribute("lemonade.reason", error.reason)
                load.span.set_status(trace.StatusCode.ERROR, error.message)
                log.warning(
                    "%s: load failed after %.3f s: %s (%s)",
                    job.name,
                    seconds,
                    error.message,
                    error.reason,
                    extra={"fields": {**fields_, "reason": error.reason}},
                )
                return
            assert result is not None
            evicted = ", ".join(result.evicted)
            log.info(
                "%s: loaded in %.3f s (%s, pid %d)%s",
                job.name,
                seconds,
                job.origin.value,
                result.model.pid,
                f", evicted {evicted}" if evicted else "",
                extra={"fields": {**fields_, "pid": result.model.pid, "evicted": list(result.evicted)}},
            )

    @_never_raises
    def unloaded(self, name: str, reason: UnloadReason, pid: int, message: str) -> None:
        if self._instruments is not None:
            self._instruments.unloads.add(1, {"model": name, "reason": reason.value})
        fields_ = {"event": "unload", "model": name, "reason": reason.value, "pid": pid}
        if reason is UnloadReason.CRASHED:
            fields_["event"] = "crash"
            log.warning("%s: backend pid %d crashed: %s", name, pid, message, extra={"fields": fields_})
        else:
            log.info("%s: unloaded (%s), pid %d", name, reason.value, pid, extra={"fields": fields_})

    @_never_raises
    def restarting(self, name: str) -> None:
        if self._instruments is not None:
            self._instruments.restarts.add(1, {"model": name})
        log.info("%s: restarting after a crash", name, extra={"fields": {"event": "restart", "model": name}})
