"""The service's metric instruments: gauges that drop to zero, labels a client cannot choose."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from conftest import ServerFactory, connect, fake_model, fake_spec, launcher
from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as ipb
from lemonade_grpc.core.options import RequestedOptions
from lemonade_grpc.core.settings import PoolSettings
from lemonade_grpc.pool.pool import Pool
from recorded import Recorded
from serve_telemetry import prometheus_port, scrape

# ------------------------------------------------------------- gauges


async def test_the_models_gauge_drops_to_zero_when_the_last_model_leaves(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Was: once the pool is empty `lemonade.models` (and `lemonade.models.pinned`) report no
    point at all, so `lemonade_models{type="llm",state="ready"}` vanishes from /metrics instead of
    reading 0 (`sum(lemonade_models{state="ready"})` is then empty, not 0, and alerts on "no ready
    model" never fire). `Instruments._models` emits the READY zero only "for every type seen" in
    the snapshot, and an empty pool has no type; the SDK drops unobserved points of an
    asynchronous gauge. telemetry/test_service.py's scrape looks right only because a FAILED model stays."""
    record = Recorded()
    pool = Pool(
        {"m": fake_spec("m", tiny_model)},
        PoolSettings(stop_grace_seconds=1.5),
        launcher(tmp_path / "logs"),
        observer=record.telemetry.observer,
    )
    record.telemetry.observe(pool)
    try:
        await pool.load("m", RequestedOptions(), pinned=True).outcome()
        assert ({"type": "llm", "state": "ready"}, 1) in record.points("lemonade.models")
        assert ({"type": "llm"}, 1) in record.points("lemonade.models.pinned")
        await pool.unload("m")
        models = record.points("lemonade.models")
        pinned = record.points("lemonade.models.pinned")
    finally:
        await pool.shutdown()
    assert ({"type": "llm", "state": "ready"}, 0) in models, models
    assert ({"type": "llm"}, 0) in pinned, pinned


# ----------------------------------------------- metric labels from requests


async def test_a_client_cannot_put_arbitrary_model_names_into_metric_labels(
    servers: ServerFactory, tiny_model: Path
) -> None:
    """Was: `lemonade.streams` is labelled with `request.model` exactly as the client sent it,
    also when the name is unknown (MODEL_NOT_FOUND) or not a model name at all (INVALID_ARGUMENT,
    up to the 4 MB message limit). `Inference._relay` calls `stream_ended(model, ...)` in its
    finally for every error that `Pool.lease` raises, before the name was checked against the
    catalog, and `RecordingStreams.stream_ended` uses it as the label. Each distinct name is a
    time series kept for the life of the process, in every scrape and OTLP export: 20 requests with
    100 kB names make /metrics 2 MB (memory, scrape time and the TSDB's cardinality grow without
    bound), and once the SDK's cardinality limit is reached the streams of real models are folded
    into an `otel_metric_overflow` series and vanish from their own."""
    server = servers.start(
        '[telemetry]\nprometheus_listen = "127.0.0.1:0"\n' + fake_model("real", tiny_model)
    )
    port = prometheus_port(server.log())
    async with connect(server.address) as client:
        for index in range(20):
            name = f"{index}-" + "x" * 100_000  # not a model name: too long
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in client.inference.Complete(ipb.CompleteRequest(model=name, prompt="x")):
                    pass
        for index in range(20):
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in client.inference.Complete(
                    ipb.CompleteRequest(model=f"no-such-model-{index}", prompt="x")
                ):
                    pass
    samples = await scrape(port)
    labels = {
        dict(sample_labels).get("model", "")
        for (name, sample_labels) in samples
        if name.startswith("lemonade_")
    }
    assert all(label in ("", "real") for label in labels), (
        f"{len(labels)} model labels, {sum(map(len, labels)):,} characters in all"
    )
