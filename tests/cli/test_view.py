"""The CLI's status table, progress line and Watch lines, as pure functions.

The last test feeds a Watch line a hostile backend's output (issue 12's attacks).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from in_process import make_pool, shell_spec
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.api import convert
from lemonade_grpc.cli.view import (
    bar,
    duration,
    plan_text,
    progress_bar,
    progress_line,
    size,
    status_table,
    watch_line,
)
from lemonade_grpc.core.errors import BackendStartFailed
from lemonade_grpc.core.options import RequestedOptions
from lemonade_grpc.pool.events import LoadFailed
from lemonade_grpc.pool.pool import Pool


def test_the_table_lines_up_and_says_when_each_model_goes_idle() -> None:
    idle_at = Timestamp(seconds=1_000 + 245)
    pool = pb.PoolStatus(
        models=[
            pb.ModelStatus(
                name="tiny", state=pb.MODEL_STATE_READY, pid=4242, rss_bytes=612 << 20, idle_unload_at=idle_at
            ),
            pb.ModelStatus(name="qwen2.5-7b", state=pb.MODEL_STATE_LOADING, pinned=True, pid=77),
            pb.ModelStatus(name="busy", state=pb.MODEL_STATE_READY, pid=9, rss_bytes=3 << 30, in_flight=2),
        ]
    )
    assert status_table(pool, now=1_000).splitlines() == [
        "NAME        STATE    PINNED  PID   MEMORY   IN FLIGHT  IDLE UNLOAD IN",
        "tiny        ready    no      4242  612 MiB  0          4m 05s",
        "qwen2.5-7b  loading  yes     77    -        0          never (pinned)",
        "busy        ready    no      9     3.0 GiB  2          busy",
    ]


def test_colours_only_when_asked() -> None:
    pool = pb.PoolStatus(models=[pb.ModelStatus(name="m", state=pb.MODEL_STATE_FAILED)])
    assert "\x1b[31mfailed" in status_table(pool, now=0, colour=True)
    assert "\x1b[" not in status_table(pool, now=0)
    assert status_table(pb.PoolStatus(), now=0) == "no models loaded"


def test_sizes_durations_and_progress_lines() -> None:
    assert [size(0), size(800 * 1024), size(612 << 20), size(3 << 29)] == [
        "-",
        "800 KiB",
        "612 MiB",
        "1.5 GiB",
    ]
    assert [duration(-3), duration(45), duration(245), duration(7_800)] == ["0s", "45s", "4m 05s", "2h 10m"]
    queued = pb.LoadResponse(phase=pb.LOAD_PHASE_QUEUED, queue_position=2, fraction=-1)
    loading = pb.LoadResponse(phase=pb.LOAD_PHASE_LOADING, fraction=0.4, message="waiting for /health")
    assert progress_line(queued) == "QUEUED (position 2)"
    assert progress_line(loading) == "LOADING 40% waiting for /health"


def test_progress_bars_watch_lines_and_plans() -> None:
    assert [bar(-1, 10), bar(0, 10), bar(0.45, 10), bar(1, 10)] == [
        "[..........]",
        "[..........]",
        "[####......]",
        "[##########]",
    ]
    reading = pb.LoadResponse(
        phase=pb.LOAD_PHASE_LOADING, fraction=0.45, message="reading weights: 178 of 395 MiB"
    )
    assert progress_bar(reading) == f"LOADING   {bar(0.45)}  45%  reading weights: 178 of 395 MiB"
    starting = pb.LoadResponse(phase=pb.LOAD_PHASE_STARTING, fraction=-1, message="starting backend")
    assert progress_bar(starting) == f"STARTING  {bar(-1)}   --  starting backend"
    assert progress_bar(reading, colour=True).startswith("\x1b[1mLOADING")
    progress = pb.WatchResponse(
        sequence=12,
        load_progress=pb.LoadProgress(
            model="tiny", phase=pb.LOAD_PHASE_LOADING, fraction=0.9, message="warming up"
        ),
    )
    assert watch_line(progress) == "#12 tiny LOADING 90% warming up"
    gone = pb.WatchResponse(
        sequence=13, model_unloaded=pb.ModelUnloaded(model="tiny", reason=pb.UNLOAD_REASON_IDLE, pid=7)
    )
    assert watch_line(gone) == "#13 tiny unloaded (idle)"
    updated = pb.WatchResponse(
        sequence=14,
        model_updated=pb.ModelUpdated(
            status=pb.ModelStatus(
                name="tiny", pid=7, pinned=True, options=pb.LoadOptions(idle_unload_seconds=60)
            )
        ),
    )
    assert watch_line(updated) == "#14 tiny updated in place (pid 7, idle unload after 60 s, pinned)"
    snapshot = pb.WatchResponse(
        sequence=1, snapshot=pb.PoolStatus(models=[pb.ModelStatus(name="a", state=pb.MODEL_STATE_READY)])
    )
    assert watch_line(snapshot) == "#1 snapshot: a (ready)"
    told = pb.PlanResponse(
        outcome=pb.PLAN_OUTCOME_LOAD,
        message="b would be started after stopping a (evicted_lru)",
        need_bytes=2 << 30,
        available_bytes=10 << 30,
        reserve_bytes=512 << 20,
        loads_ahead=1,
    )
    assert plan_text(told).splitlines() == [
        "LOAD: b would be started after stopping a (evicted_lru)",
        "memory: needs 2.0 GiB, 10.0 GiB available, 512 MiB kept in reserve",
        "1 load(s) ahead of it; they may change this plan",
    ]


# --- the CLI's lines for people -------------------------------------------------------------------


async def test_watch_lines_on_a_terminal_carry_no_control_characters_from_a_backends_output(
    tiny_model: Path, tmp_path: Path, pools: list[Pool]
) -> None:
    # A backend (or a model file whose metadata it prints) writes terminal escapes, then fails.
    script = "printf 'loading\\033]0;owned\\007\\033[2J\\033[1A\\rfake prompt $ \\n'; exit 3"
    pool = make_pool(tmp_path, {"evil": shell_spec("evil", tiny_model, script)})
    pools.append(pool)
    subscription = pool.bus.subscribe()
    with pytest.raises(BackendStartFailed):
        await pool.load("evil", RequestedOptions()).outcome()
    failed = [e for e in subscription.drain() if isinstance(e.event, LoadFailed)]
    assert len(failed) == 1
    event = failed[0].event
    assert isinstance(event, LoadFailed)
    assert "\x1b]0;owned" in event.message  # the backend's bytes, as it printed them
    line = watch_line(convert.watch_event(failed[0], 0))
    assert not [c for c in line if c < " " or c == "\x7f"], repr(line)
