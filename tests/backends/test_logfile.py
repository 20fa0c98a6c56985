"""Backends' logs: capped, rotated, pruned, never in the way of the state files; drained as fast as they come.

Issue 18 finding 6: a backend logging ~1.2 MiB/s filled a 16 MiB state
filesystem; then Pin answered STATE_WRITE_FAILED (ENOSPC on pins.json) and
every Load failed STATE_WRITE_FAILED. Finding 7: a ready backend's output
was read one 64 KiB chunk per 50 ms, so a backend writing 64 KiB of stderr
per token streamed 19.5 tokens/s, blocked in write().
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ServerFactory, connect, eventually, fake_model, fake_spec, launch_backend
from lemonade_grpc._gen.lemonade.v1 import inference_pb2
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.backends import output
from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.backends.logfile import BackendLog, free_bytes
from lemonade_grpc.config import ConfigError, Overrides, load
from lemonade_grpc.core.settings import BackendLogSettings

MiB = 1 << 20
CHUNK = 65536
DROPPED_NOTE = b"bytes of backend output dropped here"


def pinned_in(state_dir: Path) -> dict[str, object]:
    path = state_dir / "pins.json"
    return dict(json.loads(path.read_text())["pinned"]) if path.exists() else {}


def chunks(count: int, label: str = "c") -> list[bytes]:
    """`count` distinct 64 KiB chunks, each a line."""
    return [(f"{label}{index} ".encode() + b"y" * CHUNK)[: CHUNK - 1] + b"\n" for index in range(count)]


def test_backend_log_settings_from_the_file_and_defaults(tmp_path: Path) -> None:
    assert load(Overrides(state_dir=tmp_path), env={}).backend_logs == BackendLogSettings()
    path = tmp_path / "c.toml"
    path.write_text("[backend_logs]\nmax_file_mb = 2\nmax_total_mb = 10\nmin_free_mb = 0\n")
    settings = load(Overrides(config=path, state_dir=tmp_path), env={}).backend_logs
    assert (settings.max_file_bytes, settings.max_total_bytes, settings.min_free_bytes) == (
        2 * MiB,
        10 * MiB,
        0,
    )


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("max_file_mb = 0", "backend_logs.max_file_mb"),
        ("max_total_mb = 1.5", "backend_logs.max_total_mb"),
        ("min_free_mb = -1", "backend_logs.min_free_mb"),
        ("max_files = 3", "backend_logs.max_files"),
    ],
)
def test_bad_backend_log_settings_name_the_field(tmp_path: Path, line: str, field: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[backend_logs]\n{line}\n")
    with pytest.raises(ConfigError) as error:
        load(Overrides(config=path, state_dir=tmp_path), env={})
    assert error.value.field == field


def test_finding_6_a_log_is_rotated_at_its_cap_and_keeps_the_newest_output(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "m.log"
    log = BackendLog(path, BackendLogSettings(max_file_mb=1, min_free_mb=0))
    written = chunks(56)  # 3.5 MiB
    for chunk in written:
        log.write(chunk)
    log.close()
    rotated = path.with_name("m.log.1")
    assert path.stat().st_size <= MiB
    assert rotated.stat().st_size <= MiB
    # Nothing lost between the two files: they hold the newest output, in order.
    kept = rotated.read_bytes() + path.read_bytes()
    assert kept == b"".join(written)[-len(kept) :]
    assert len(kept) > MiB
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.log", "m.log.1"]


def test_finding_6_output_that_would_eat_the_free_space_reserve_is_dropped_counted_and_said(
    tmp_path: Path,
) -> None:
    # A filesystem of 3 MiB, seen through the log's free-space probe; the reserve is 1 MiB.
    path = tmp_path / "m.log"
    capacity = 3 * MiB

    def free() -> int:
        size = sum(p.stat().st_size for p in tmp_path.iterdir())
        return capacity - size

    log = BackendLog(path, BackendLogSettings(max_file_mb=16, min_free_mb=1), free=free)
    for chunk in chunks(80):  # 5 MiB
        log.write(chunk)
    assert free() >= MiB, "the log ate into the reserve"
    assert path.stat().st_size == 2 * MiB
    assert log.dropped == 3 * MiB
    assert DROPPED_NOTE not in path.read_bytes()  # not yet: there is no room
    capacity = 8 * MiB  # room again (the operator cleaned up): the next write says what was lost
    log.write(b"back\n")
    text = path.read_bytes()
    assert (
        f"\n[lemonade-grpc] {3 * MiB} bytes of backend output dropped here: less than 1 MiB".encode() in text
    )
    assert text.endswith(b"min_free_mb)\nback\n")
    assert log.dropped == 0
    capacity = 0  # full again: dropped, and said at close even so
    log.write(b"lost\n")
    log.close()
    end = path.read_bytes()[len(text) :]
    assert end.startswith(b"\n[lemonade-grpc] 5 bytes of backend output dropped here: less than 1 MiB")
    assert end.endswith(b"min_free_mb)\n")


def test_finding_6_old_logs_of_models_not_running_are_deleted_oldest_first_down_to_the_total(
    tmp_path: Path,
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    settings = BackendLogSettings(max_file_mb=1, max_total_mb=3, min_free_mb=0)
    running = BackendLog(logs / "running.log", settings)
    running.write(b"r" * MiB)  # the oldest of all, but open: kept
    os.utime(logs / "running.log", (1, 1))
    for age, name in enumerate(["a.log", "a.log.1", "b.log", "c.log.1", "d.log"]):
        (logs / name).write_bytes(b"o" * MiB)
        os.utime(logs / name, (100 + age, 100 + age))
    (logs / "notes.txt").write_bytes(b"n" * MiB)  # not a log: neither counted nor deleted
    BackendLog(logs / "new.log", settings).close()
    running.close()
    # 6 MiB of logs, 3 allowed: the three oldest not open go.
    assert sorted(p.name for p in logs.iterdir()) == [
        "c.log.1",
        "d.log",
        "new.log",
        "notes.txt",
        "running.log",
    ]
    assert running.dropped_total == 0


def test_a_failed_starts_tail_is_this_runs_output_even_across_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "m.log"
    settings = BackendLogSettings(max_file_mb=1, min_free_mb=0)
    earlier = BackendLog(path, settings)
    earlier.write(b"earlier run\n")
    earlier.close()
    log = BackendLog(path, settings)
    log.write(b"this run starts\n")
    for chunk in chunks(20):  # 1.25 MiB: rotates once
        log.write(chunk)
    log.write(b"this run ends\n")
    assert path.with_name("m.log.1").exists()
    assert log.tail(10 * MiB).startswith(b"this run starts\n")
    assert log.tail(10 * MiB).endswith(b"this run ends\n")
    assert log.tail(100) == (b"".join(chunks(20)) + b"this run ends\n")[-100:]
    log.close()


async def test_finding_7_a_backend_writing_64_kib_of_stderr_per_token_is_not_throttled(
    tmp_path: Path, tiny_model: Path, spawned: list[Backend], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A deferral of 300 s: a stream that waited on one would not end within the test's deadline.
    # Before the fix each 64 KiB chunk waited for one (19.5 tokens/s at 50 ms).
    monkeypatch.setattr(output, "DEFER_SECONDS", 300.0)
    spec = fake_spec("loud", tiny_model, "--stderr-bytes-per-token", str(CHUNK))
    logs = tmp_path / "logs"
    backend = await launch_backend(spec, logs, spawned, log_settings=BackendLogSettings(min_free_mb=0))
    try:
        tokens = 0
        async with asyncio.timeout(60):
            async for batch in backend.client.stream("/v1/completions", {"prompt": "p", "max_tokens": 64}):
                tokens += sum(1 for chunk in batch if chunk.text)
        assert tokens == 64
        log = logs / "loud.log"
        await eventually(lambda: log.stat().st_size >= 64 * CHUNK, 30, "every token's output in the log")
        assert backend.process.output.deferrals == 0
    finally:
        await backend.stop(2.0)
    assert log.read_bytes().count(b"\n") >= 64


async def test_finding_6_logs_stay_under_their_cap_and_pin_and_load_still_write_state(
    servers: ServerFactory, tiny_model: Path
) -> None:
    # 3 MiB at start and 40 x 64 KiB per stream, against a 1 MiB cap per file.
    config = (
        "[backend_logs]\nmax_file_mb = 1\nmin_free_mb = 0\n[pool]\nmax_loaded = { llm = 2 }\n"
        + fake_model(
            "loud", tiny_model, "--spew-stderr-bytes", str(3 * MiB), "--stderr-bytes-per-token", str(CHUNK)
        )
        + fake_model("quiet", tiny_model)
    )
    server = servers.start(config)
    logs = server.state_dir / "logs"
    async with connect(server.address) as client:
        await client.ready("loud")
        request = inference_pb2.CompleteRequest(model="loud", prompt="p", max_tokens=40)
        replies = [reply async for reply in client.inference.Complete(request)]
        assert replies[-1].finish_reason
        await eventually(
            lambda: b"token 39 " in (logs / "loud.log").read_bytes(), 30, "the last token's line"
        )
        for log in logs.iterdir():
            assert log.stat().st_size <= MiB, f"{log.name}: {log.stat().st_size} bytes"
        pinned = await client.control.Pin(pb.PinRequest(model="loud", pinned=True))
        assert pinned.status.pinned
        await eventually(lambda: "loud" in pinned_in(server.state_dir), 10, "the pin in pins.json")
        await client.ready("quiet")
    assert sorted(p.name for p in logs.iterdir()) == ["loud.log", "loud.log.1", "quiet.log"]


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, as in the issue's reproduction; skipped where mounting is not permitted."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 16 MiB tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_finding_6_logs_that_would_fill_a_16_mib_state_filesystem_leave_pins_and_loads_working(
    small_filesystem: Path, servers: ServerFactory, tiny_model: Path
) -> None:
    # 20 MiB at start and 10 MiB in one stream: more than the whole filesystem. Before the fix the
    # log took every byte, and then Pin and every Load failed STATE_WRITE_FAILED.
    config = (
        "[backend_logs]\nmin_free_mb = 4\n[pool]\nmax_loaded = { llm = 2 }\n"
        + fake_model(
            "loud", tiny_model, "--spew-stderr-bytes", str(20 * MiB), "--stderr-bytes-per-token", str(CHUNK)
        )
        + fake_model("quiet", tiny_model)
    )
    state_dir = small_filesystem / "state"
    server = servers.start(config, state_dir=state_dir)
    reserve_kept = 4 * MiB - CHUNK  # a write is checked before it is made; tmpfs counts pages
    try:
        async with connect(server.address) as client:
            await client.ready("loud")
            request = inference_pb2.CompleteRequest(model="loud", prompt="p", max_tokens=160)
            replies = [reply async for reply in client.inference.Complete(request)]
            assert replies[-1].finish_reason
            free = free_bytes(state_dir)
            assert free is not None
            assert free >= reserve_kept, f"{free} bytes free"
            pinned = await client.control.Pin(pb.PinRequest(model="loud", pinned=True))
            assert pinned.status.pinned
            await eventually(lambda: "loud" in pinned_in(state_dir), 10, "the pin in pins.json")
            await client.ready("quiet")  # records its backend in backends.json
            records = json.loads((state_dir / "backends.json").read_text())
            assert len(records["backends"]) == 2, records
            await client.control.Unload(pb.UnloadRequest(model="loud"))
    finally:
        server.stop()
    log = (state_dir / "logs" / "loud.log").read_bytes()
    assert DROPPED_NOTE in log, "the log does not say that output was dropped"
    assert b"min_free_mb" in log
    assert "dropping backend output" in server.log()
