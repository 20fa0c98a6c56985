"""Load progress: the model file's bytes taken in, and the stage llama-server's log names.

The first tests use a model of real size: the generated ~400 MB model, read
from a cold page cache. One of them runs by default; the others load the big
model again and are behind the `big_model` marker (`pytest -m big_model`).
The last two (issue 12's attacks) unload during a llama load and load a
`command` model, which reports phases only.
"""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path
from typing import Any

import pytest

from conftest import ServerFactory, connect, eventually, fake_spec, llama_model
from in_process import OPTIONS, make_pool
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.backends.progress import WEIGHTS_SHARE, ProgressEstimate, Stage, stage_of
from lemonade_grpc.core.catalog import ModelSpec, ModelType, Recipe
from lemonade_grpc.core.errors import LemonadeError
from lemonade_grpc.core.options import RequestedOptions
from lemonade_grpc.core.settings import PoolSettings
from lemonade_grpc.pool.events import LoadFailed, LoadPhase
from lemonade_grpc.pool.events import LoadProgress as BusLoadProgress
from lemonade_grpc.pool.pool import Pool
from lemonade_grpc.provision.tiny_model import ensure_model


@pytest.fixture(scope="session")
def medium_model() -> Path:
    return ensure_model("medium")


def evict_from_page_cache(path: Path) -> None:
    """Drop the file's pages from the page cache (no privilege needed): the next load reads the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def progress_config(model: Path, *args: str) -> str:
    return "[pool]\nprogress_seconds = 0.02\n" + llama_model("medium", model, ctx_size=512, args=list(args))


async def load_watched(address: str) -> tuple[list[pb.LoadResponse], list[pb.LoadProgress]]:
    """Load `medium`, following the Load stream and a Watch stream opened before it."""
    async with connect(address) as client:
        watch = client.control.Watch(pb.WatchRequest())
        await watch.read()  # the snapshot: subscribed
        responses = await client.load_all("medium")
        seen: list[pb.LoadProgress] = []
        while True:  # until the model_loaded event that ends the load on Watch
            event = await asyncio.wait_for(watch.read(), 10)
            assert isinstance(event, pb.WatchResponse)
            if event.HasField("model_loaded") and event.model_loaded.status.name == "medium":
                break
            if event.HasField("load_progress") and event.load_progress.model == "medium":
                seen.append(event.load_progress)
        watch.cancel()
    return responses, seen


def loading_fractions(responses: list[pb.LoadResponse]) -> list[float]:
    return [r.fraction for r in responses if r.phase == pb.LOAD_PHASE_LOADING and r.fraction >= 0]


def assert_progress(fractions: list[float]) -> None:
    assert len(fractions) >= 3, fractions
    assert fractions == sorted(fractions), fractions  # monotonic
    assert all(0 <= f < 1 for f in fractions), fractions  # 1 only at READY
    # From the bytes taken in, not only from the stages' fixed floors.
    assert any(0 < f < WEIGHTS_SHARE for f in fractions), fractions


async def test_a_real_sized_model_shows_a_growing_fraction_that_reaches_1_at_ready(
    servers: ServerFactory, medium_model: Path
) -> None:
    server = servers.start(progress_config(medium_model))
    evict_from_page_cache(medium_model)
    responses, watched = await load_watched(server.address)
    fractions = loading_fractions(responses)
    print("fractions seen during the load:", [round(f, 3) for f in fractions])
    assert_progress(fractions)
    assert responses[-1].phase == pb.LOAD_PHASE_READY
    assert responses[-1].fraction == 1.0
    # Messages name what it is doing: the weights read so far, then the stages.
    assert any("reading weights" in r.message and "MiB" in r.message for r in responses)
    # Watch saw the same progress.
    assert [p.fraction for p in watched if p.phase == pb.LOAD_PHASE_LOADING and p.fraction >= 0] == fractions


@pytest.mark.big_model
async def test_without_mmap_the_bytes_read_drive_the_fraction(
    servers: ServerFactory, medium_model: Path
) -> None:
    server = servers.start(progress_config(medium_model, "--load-mode", "none"))
    evict_from_page_cache(medium_model)
    responses, _ = await load_watched(server.address)
    assert_progress(loading_fractions(responses))
    assert responses[-1].fraction == 1.0


def test_the_stages_come_from_llama_servers_log_lines_and_only_move_forward() -> None:
    lines = {
        "0.00.004.904 I srv    load_model: loading model '/m.gguf'": None,
        "0.00.007.589 I load_tensors: loading model tensors, this can take a while...": None,
        "0.00.008.108 I llama_context: constructing llama_context": Stage.CONTEXT,
        "0.00.008.163 I llama_kv_cache:        CPU KV buffer size =     0.25 MiB": Stage.CONTEXT,
        "0.00.009.470 I cmn  common_init_: warming up the model with an empty run": Stage.CONTEXT,
        "0.00.017.026 I srv    load_model: initializing, n_slots = 4, n_ctx_slot = 512": Stage.SLOTS,
        "0.00.018.633 I srv  llama_server: model loaded": Stage.LOADED,
        "0.00.018.665 I srv  llama_server: listening on http://127.0.0.1:18777": None,
    }
    assert {line: stage_of(line) for line in lines} == lines
    progress = ProgressEstimate(file_bytes=1000)
    seen = []
    for bytes_in, line in [
        (0, ""),
        (250, ""),
        (500, ""),
        (400, ""),
        (1000, ""),
        (1000, "load_model: initializing"),
    ]:
        progress.read(bytes_in)
        progress.line(line)
        seen.append((round(progress.fraction, 3), progress.stage))
    assert seen == [
        (0.0, Stage.WEIGHTS),
        (0.225, Stage.WEIGHTS),
        (0.45, Stage.WEIGHTS),
        (0.45, Stage.WEIGHTS),  # fewer bytes reported: never backwards
        (0.9, Stage.CONTEXT),  # every byte in: the context and warm-up are next
        (0.95, Stage.SLOTS),
    ]
    progress.line("llama_context: constructing")  # an earlier stage's line: ignored
    assert progress.stage is Stage.SLOTS
    progress.line("llama_server: model loaded")
    assert progress.fraction == 0.99  # never 1 before READY


def test_an_empty_model_file_reports_stages_only() -> None:
    progress = ProgressEstimate(file_bytes=0)
    progress.read(10)
    assert (progress.fraction, progress.stage) == (0.0, Stage.WEIGHTS)
    progress.line("llama_kv_cache: CPU KV buffer")
    assert progress.fraction == WEIGHTS_SHARE


# --- load progress --------------------------------------------------------------------------------


def reporters() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and getattr(task.get_coro(), "__name__", "") == "_report_progress"
    ]


async def test_an_unload_during_a_llama_load_ends_its_progress_and_its_reporter(
    llama_server_binary: Path, tmp_path: Path, pools: list[Pool]
) -> None:
    medium = ensure_model("medium")
    fd = os.open(medium, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # a cold load: slow enough to catch
    os.close(fd)
    spec = ModelSpec("medium", Recipe.LLAMACPP, medium, ModelType.LLM, OPTIONS)
    pool = Pool(
        {"medium": spec},
        PoolSettings(memory_reserve_mb=0, memory_check_seconds=0, progress_seconds=0.01),
        functools.partial(
            Backend.launch,
            log_dir=tmp_path / "logs",
            registry=None,
            health_timeout=60,
            stop_grace=2,
            progress_seconds=0.01,
        ),
        estimate=lambda spec, options: 1,
    )
    pools.append(pool)
    events = pool.bus.subscribe()
    job = pool.load("medium", RequestedOptions())
    await eventually(lambda: job.fraction > 0, 30, "a fraction above 0")
    assert reporters()
    await pool.unload("medium")
    with pytest.raises(LemonadeError):
        await job.outcome()
    assert job.task is not None
    await asyncio.wait({job.task})  # its reporter is cancelled on the way out (was: a 0.2 s sleep)
    assert not reporters(), "a progress reporter outlived its load"
    seen = [e.event for e in events.drain()]
    failed = next(i for i, e in enumerate(seen) if isinstance(e, LoadFailed))
    late = [e for e in seen[failed:] if isinstance(e, BusLoadProgress)]
    assert not late, late
    fractions = [e.fraction for e in seen if isinstance(e, BusLoadProgress) and e.fraction >= 0]
    assert fractions == sorted(fractions), fractions
    assert all(f < 1 for f in fractions), fractions


async def test_a_command_model_reports_phases_only(
    tiny_model: Path, tmp_path: Path, pools: list[Pool]
) -> None:
    pool = make_pool(
        tmp_path, {"a": fake_spec("a", tiny_model, "--load-seconds", "0.5")}, progress_seconds=0.01
    )
    pools.append(pool)
    job = pool.load("a", RequestedOptions())
    await job.outcome()
    assert [p.fraction for p in job.history] == [-1.0] * len(job.history)
    assert [p.phase for p in job.history] == [LoadPhase.QUEUED, LoadPhase.STARTING, LoadPhase.LOADING]
