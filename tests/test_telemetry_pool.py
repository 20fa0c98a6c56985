"""The pool's telemetry for each way a load ends, in process (the SDK's in-memory exporter and reader).

The end-to-end path (a real OTLP receiver, the Prometheus endpoint) is in
test_telemetry.py; here, with fake backends, the outcomes a real
llama-server cannot be made to show on cue: a failed start, an eviction, a
load cancelled by Unload, a request that changes nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan

from conftest import fake_spec, launcher, poll, shut_down
from lemonade_grpc.core.catalog import ModelType
from lemonade_grpc.core.errors import LemonadeError, LoadCancelled
from lemonade_grpc.core.options import RequestedOptions
from lemonade_grpc.core.settings import PoolSettings
from lemonade_grpc.pool.pool import Pool
from lemonade_grpc.telemetry.otel import TelemetryConfigError, otlp_protocol, otlp_wanted
from recorded import Recorded


@pytest.fixture
async def recorded(tmp_path: Path, tiny_model: Path) -> AsyncIterator[tuple[Recorded, Pool]]:
    record = Recorded()
    catalog = {
        "a": fake_spec("a", tiny_model),
        "b": fake_spec("b", tiny_model),
        "broken": fake_spec("broken", tiny_model, "--fail-start"),
        "slow": fake_spec("slow", tiny_model, "--load-seconds", "30"),
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
        await shut_down(pool)


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
    with pytest.raises(LemonadeError) as failure:
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
        {"crashy": fake_spec("crashy", tiny_model, "--exit-after-seconds", "0.3")},
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
