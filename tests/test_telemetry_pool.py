"""The pool's telemetry for each way a load ends, in process (the SDK's in-memory exporter and reader).

The end-to-end path (a real OTLP receiver, the Prometheus endpoint) is in
test_telemetry.py; here, with fake backends, the outcomes a real
llama-server cannot be made to show on cue: a failed start, an eviction, a
load cancelled by Unload, a request that changes nothing.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conftest import FAKE_BACKEND, is_gone, launcher, poll
from lemonade_grpc.catalog import ModelSpec, ModelType, Recipe
from lemonade_grpc.pool.errors import LoadCancelled, PoolError
from lemonade_grpc.pool.options import EffectiveOptions, RequestedOptions
from lemonade_grpc.pool.pool import Pool
from lemonade_grpc.pool.settings import PoolSettings
from lemonade_grpc.telemetry.otel import Providers, TelemetryConfigError, otlp_protocol, otlp_wanted
from lemonade_grpc.telemetry.service import Telemetry


def spec(name: str, model_file: Path, *flags: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        recipe=Recipe.COMMAND,
        path=model_file,
        type=ModelType.LLM,
        defaults=EffectiveOptions(ctx_size=256, idle_unload_seconds=None, backend_args=()),
        command=(sys.executable, str(FAKE_BACKEND), "--port", "{port}", "--model", "{path}", *flags),
    )


class Recorded:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        meter_provider = MeterProvider(metric_readers=[self.metrics])
        self.telemetry = Telemetry(
            Providers(
                tracer=tracer_provider.get_tracer("test"),
                meter=meter_provider.get_meter("test"),
                tracer_provider=tracer_provider,
                meter_provider=meter_provider,
            )
        )

    def finished(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]

    def phases(self, load: ReadableSpan) -> list[tuple[str, dict[str, Any]]]:
        assert load.context is not None
        return [
            (s.name, dict(s.attributes or {}))
            for s in sorted(self.spans.get_finished_spans(), key=lambda s: s.start_time or 0)
            if s.parent is not None and s.parent.span_id == load.context.span_id
        ]

    def counter(self, name: str, **labels: str) -> float:
        data = self.metrics.get_metrics_data()
        assert data is not None
        total = 0.0
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            if labels.items() <= dict(point.attributes or {}).items():
                                total += point.value  # type: ignore[union-attr]
        return total


@pytest.fixture
async def recorded(tmp_path: Path, tiny_model: Path) -> AsyncIterator[tuple[Recorded, Pool]]:
    record = Recorded()
    catalog = {
        "a": spec("a", tiny_model),
        "b": spec("b", tiny_model),
        "broken": spec("broken", tiny_model, "--fail-start"),
        "slow": spec("slow", tiny_model, "--load-seconds", "30"),
    }
    pool = Pool(
        catalog,
        PoolSettings(max_loaded={ModelType.LLM: 1}, evict_grace_seconds=0, stop_grace_seconds=1.5),
        launcher(tmp_path / "logs"),
        observer=record.telemetry.observer,
    )
    record.telemetry.observe(pool)
    try:
        yield record, pool
    finally:
        pids = [view.pid for view in pool.views()]
        await pool.shutdown()
        assert all(is_gone(pid) for pid in pids)


async def test_an_eviction_is_a_phase_of_the_load_and_an_unload_by_reason(
    recorded: tuple[Recorded, Pool],
) -> None:
    record, pool = recorded
    await pool.load("a", RequestedOptions()).outcome()
    await pool.load("b", RequestedOptions(ctx_size=512)).outcome()
    await pool.load("b", RequestedOptions()).outcome()  # nothing to do: counted, no span
    (load_b,) = record.finished("load b")
    assert load_b.status.status_code is trace.StatusCode.UNSET
    assert dict(load_b.attributes or {})["lemonade.options.ctx_size"] == 512
    phases = record.phases(load_b)
    assert [name for name, _ in phases] == ["queued", "evicting", "starting", "loading"]
    assert phases[1][1] == {"lemonade.evicted": "a", "lemonade.reason": "evicted_lru"}
    assert record.counter("lemonade.unloads", model="a", reason="evicted_lru") == 1
    assert record.counter("lemonade.loads", model="b", outcome="loaded") == 1
    assert record.counter("lemonade.loads", model="b", outcome="already_loaded") == 1
    assert len(record.finished("load b")) == 1


async def test_a_failed_load_is_an_error_span_with_its_reason(recorded: tuple[Recorded, Pool]) -> None:
    record, pool = recorded
    with pytest.raises(PoolError) as failure:
        await pool.load("broken", RequestedOptions()).outcome()
    (load,) = record.finished("load broken")
    assert load.status.status_code is trace.StatusCode.ERROR
    assert load.status.description == failure.value.message
    assert dict(load.attributes or {})["lemonade.reason"] == failure.value.reason
    assert [name for name, _ in record.phases(load)] == ["queued", "starting", "loading"]
    assert record.counter("lemonade.loads", model="broken", outcome=failure.value.reason) == 1


async def test_a_load_cancelled_by_unload_ends_its_span(recorded: tuple[Recorded, Pool]) -> None:
    record, pool = recorded
    job = pool.load("slow", RequestedOptions())
    async for progress in job.follow():
        if progress.phase.name == "LOADING":
            break
    await pool.unload("slow")
    with pytest.raises(LoadCancelled):
        await job.outcome()
    (load,) = record.finished("load slow")
    assert dict(load.attributes or {})["lemonade.reason"] == "LOAD_CANCELLED"
    assert record.counter("lemonade.loads", model="slow", outcome="LOAD_CANCELLED") == 1
    assert record.counter("lemonade.unloads", model="slow", reason="requested") == 1


@pytest.mark.parametrize(
    ("env", "traces", "metrics"),
    [
        ({}, False, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, True, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317/v1/traces"}, True, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_METRICS_EXPORTER": "none"}, True, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}, False, False),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "console,otlp"},
            True,
            True,
        ),
    ],
)
def test_the_standard_variables_say_what_is_exported(
    env: dict[str, str], traces: bool, metrics: bool
) -> None:
    assert (otlp_wanted(env, "TRACES"), otlp_wanted(env, "METRICS")) == (traces, metrics)


def test_an_unknown_protocol_is_refused_by_name() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}
    assert otlp_protocol(env, "METRICS") == "grpc"
    with pytest.raises(TelemetryConfigError, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='http/json'"):
        otlp_protocol(env, "TRACES")


async def test_a_crash_and_its_restart_are_counted_and_the_restart_is_a_root_span(
    tmp_path: Path, tiny_model: Path
) -> None:
    record = Recorded()
    pool = Pool(
        {"crashy": spec("crashy", tiny_model, "--exit-after-seconds", "0.3")},
        PoolSettings(restart_backoff_seconds=0.05, max_restarts=1, stop_grace_seconds=1.5),
        launcher(tmp_path / "logs"),
        observer=record.telemetry.observer,
    )
    try:
        await pool.load("crashy", RequestedOptions(), pinned=True).outcome()

        async def restarted() -> list[ReadableSpan] | None:
            loads = record.finished("load crashy")
            return loads if len(loads) == 2 and record.counter("lemonade.backend.restarts") == 1 else None

        first, again = await poll(restarted, 20, "the restart's load span")
    finally:
        await pool.shutdown()
    assert record.counter("lemonade.unloads", model="crashy", reason="crashed") >= 1
    assert dict(first.attributes or {})["lemonade.origin"] == "request"
    assert dict(again.attributes or {})["lemonade.origin"] == "restart"
    assert again.parent is None  # nobody asked for it: a trace of its own
