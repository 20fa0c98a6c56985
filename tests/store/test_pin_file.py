"""The pin file: what it holds, and what happens when it is damaged."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ServerFactory, fake_model
from lemonade_grpc.core.options import EffectiveOptions
from lemonade_grpc.store.pin_file import PinFile, StateCorrupt, decode, encode
from over_grpc import start_on

PINS = {
    "b": EffectiveOptions(ctx_size=1024, idle_unload_seconds=None, backend_args=("--flash-attn", "on")),
    "a": EffectiveOptions(ctx_size=512, idle_unload_seconds=60, backend_args=()),
}


def test_round_trip_keeps_options_and_order() -> None:
    decoded = decode(encode(PINS))
    assert decoded == PINS
    assert list(decoded) == ["b", "a"]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("{", "not JSON"),
        ("[]", "version 1"),
        ('{"version": 2, "pinned": {}}', "version 1"),
        ('{"version": 1, "pinned": []}', "'pinned' must be an object"),
        ('{"version": 1, "pinned": {"a": {"ctx_size": 0, "backend_args": []}}}', "pinned.a.ctx_size"),
        ('{"version": 1, "pinned": {"a": {"ctx_size": 8, "backend_args": [1]}}}', "pinned.a.backend_args"),
        (
            '{"version": 1, "pinned": {"a": {"ctx_size": 8, "idle_unload_seconds": -1, "backend_args": []}}}',
            "pinned.a.idle_unload_seconds",
        ),
    ],
)
def test_corrupt_text_says_what_is_wrong(text: str, complaint: str) -> None:
    with pytest.raises(StateCorrupt, match=complaint.replace(".", r"\.")):
        decode(text)


def test_a_missing_file_is_no_pins_and_no_problem(tmp_path: Path) -> None:
    assert PinFile(tmp_path / "pins.json").read() == ({}, None)


def test_a_corrupt_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "pins.json"
    path.write_text("garbage")
    pins, problem = PinFile(path).read()
    assert pins == {}
    assert problem is not None
    assert "not JSON" in problem
    [aside] = tmp_path.glob("pins.json.corrupt-*")
    assert aside.read_text() == "garbage"
    assert str(aside) in problem
    assert not path.exists()


def test_write_then_read(tmp_path: Path) -> None:
    store = PinFile(tmp_path / "nested" / "pins.json")
    store.write(PINS)
    assert store.read() == (PINS, None)
    assert not list((tmp_path / "nested").glob(".*.tmp")), "the temporary file was renamed away"


def test_a_deeply_nested_pin_file_is_moved_aside_and_the_server_keeps_running(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    """Promised: "A file that does not decode ... is moved aside (STATE_FILE_CORRUPT)"."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "pins.json").write_text('{"version": 1, "pinned": ' + "[" * 100_000)
    status, log = start_on(servers, state_dir, fake_model("m", tiny_model))
    assert status is None, f"serve died on a deeply nested pins.json:\n{log[-1500:]}"
    assert not (state_dir / "pins.json").exists(), "the corrupt pin file was not moved aside"
