"""The memory estimate's GGUF header reader: the same metadata as the `gguf` package, no numpy.

The serving process reads a model's header before each load; the `gguf`
package would pull numpy into it (issue 13's memory row), so it reads the
header itself. The package stays the reference here.
"""

from __future__ import annotations

import contextlib
import struct
import subprocess
import sys
from pathlib import Path
from typing import TypeVar

import gguf
import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FAKE_BACKEND, ServerFactory, connect, llama_model
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.backends.estimate import (
    MAX_ESTIMATE_BYTES,
    PROCESS_OVERHEAD_BYTES,
    estimate_bytes,
    kv_bytes_per_cell,
)
from lemonade_grpc.core.catalog import ModelSpec, ModelType, Recipe
from lemonade_grpc.core.gguf import MAX_NESTING, read_metadata
from lemonade_grpc.core.options import EffectiveOptions
from rpc_errors import error_info


def reference(path: Path) -> dict[str, object]:
    """Scalar and string metadata as the `gguf` package reads it."""
    reader = gguf.GGUFReader(path, "r")
    found: dict[str, object] = {}
    for name, field in reader.fields.items():
        value = field.contents()
        if isinstance(value, int | float | str) and not name.startswith("GGUF."):
            found[name] = value
    return found


def test_the_header_reads_as_the_gguf_package_reads_it(tiny_model: Path) -> None:
    ours = read_metadata(tiny_model)
    theirs = reference(tiny_model)
    assert ours == pytest.approx(theirs)
    assert ours["general.architecture"] == "llama"
    # 2 layers x 4 KV heads x (16 + 16) values x 2 bytes (f16).
    assert kv_bytes_per_cell(tiny_model, tiny_model.stat().st_mtime) == 2 * 4 * 32 * 2


def test_the_serving_process_does_not_load_numpy() -> None:
    code = (
        "import sys, lemonade_grpc.server, lemonade_grpc.backends.estimate as e, pathlib;"
        "from lemonade_grpc.provision.tiny_model import ensure_tiny_model;"
        "p = ensure_tiny_model(); e.kv_bytes_per_cell(p, p.stat().st_mtime);"
        "print(sorted({'numpy', 'gguf'} & set(sys.modules)))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"GGML" + data[4:],  # not a GGUF
        lambda data: data[:4] + struct.pack("<I", 99) + data[8:],  # a version we do not know
        lambda data: data[:40],  # cut short
        lambda data: data[:16] + struct.pack("<Q", 1 << 40) + data[24:],  # a key count from nowhere
        lambda data: data[:24] + struct.pack("<Q", 1 << 60) + data[32:],  # a first key of 2^60 bytes
    ],
    ids=["magic", "version", "truncated", "key-count", "key-length"],
)
def test_a_damaged_header_is_a_value_error_and_the_estimate_falls_back_to_the_size(
    tiny_model: Path, tmp_path: Path, damage: object
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(damage(tiny_model.read_bytes()[:4096]))  # type: ignore[operator]
    with pytest.raises(ValueError):  # noqa: PT011 - each damage has its own message
        read_metadata(broken)
    assert kv_bytes_per_cell(broken, broken.stat().st_mtime) == 0


# --- issue 18 finding 9: hostile headers ---------------------------------------------------------
#
# A header is the operator's file, but a damaged or crafted one must cost a
# warning and a fallback, never an INTERNAL or a Plan that disagrees with
# the Load it forecasts.

_U8, _U32, _STR, _ARR, _U64, _I64 = 0, 4, 8, 9, 10, 11
_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
INT64_MAX = (1 << 63) - 1
T = TypeVar("T")


def gguf_string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def gguf_field(key: str | bytes, kind: int, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", kind) + payload


def gguf_header(*fields: bytes, keys: int | None = None, version: int = 3, tensors: int = 0) -> bytes:
    count = len(fields) if keys is None else keys
    return b"GGUF" + struct.pack("<IQQ", version, tensors, count) + b"".join(fields)


def nested_arrays(depth: int) -> bytes:
    """An array value holding an array holding ... `depth` arrays deep, the innermost empty."""
    return struct.pack("<IQ", _ARR, 1) * (depth - 1) + struct.pack("<IQ", _U8, 0)


def llama_shape(block_count: int, kind: int = _U64) -> list[bytes]:
    """A llama architecture with `block_count` layers of 4 heads of 16 (embedding 64)."""
    return [
        gguf_field("general.architecture", _STR, gguf_string("llama")),
        gguf_field("llama.block_count", kind, struct.pack("<" + _FORMATS[kind], block_count)),
        gguf_field("llama.attention.head_count", _U32, struct.pack("<I", 4)),
        gguf_field("llama.embedding_length", _U32, struct.pack("<I", 64)),
    ]


HOSTILE = {
    "nested-3000": gguf_header(
        gguf_field("general.architecture", _STR, gguf_string("llama")),
        gguf_field("deep", _ARR, nested_arrays(3000)),
    ),
    "block-count-2-62": gguf_header(*llama_shape(1 << 62)),
    "block-count-u64-max": gguf_header(*llama_shape((1 << 64) - 1)),
    "block-count-negative": gguf_header(*llama_shape(-(1 << 62), _I64)),
    "array-count-u64-max": gguf_header(
        gguf_field("general.architecture", _STR, gguf_string("llama")),
        gguf_field("a", _ARR, struct.pack("<IQ", _U64, (1 << 64) - 1)),
    ),
    "string-array-count-2-62": gguf_header(
        gguf_field("general.architecture", _STR, gguf_string("llama")),
        gguf_field("tokens", _ARR, struct.pack("<IQ", _STR, 1 << 62) + gguf_string("a") * 8),
    ),
}


def llamacpp_spec(path: Path) -> ModelSpec:
    return ModelSpec(
        name="hostile",
        recipe=Recipe.LLAMACPP,
        path=path,
        type=ModelType.LLM,
        defaults=EffectiveOptions(ctx_size=2048, idle_unload_seconds=None, backend_args=()),
    )


@pytest.mark.parametrize("name", list(HOSTILE))
def test_finding_9_a_hostile_header_gives_a_bounded_estimate_and_never_raises(
    tmp_path: Path, name: str
) -> None:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(HOSTILE[name])
    spec = llamacpp_spec(path)
    need = estimate_bytes(spec, spec.defaults)
    assert path.stat().st_size <= need <= MAX_ESTIMATE_BYTES < INT64_MAX


def test_finding_9_the_ceiling_is_the_estimate_of_an_absurd_model(tmp_path: Path) -> None:
    path = tmp_path / "huge.gguf"
    path.write_bytes(HOSTILE["block-count-2-62"])
    spec = llamacpp_spec(path)
    assert estimate_bytes(spec, spec.defaults) == MAX_ESTIMATE_BYTES


def test_finding_9_nesting_past_the_bound_is_a_value_error_and_within_it_reads(tmp_path: Path) -> None:
    path = tmp_path / "nested.gguf"
    path.write_bytes(gguf_header(*llama_shape(2), gguf_field("deep", _ARR, nested_arrays(MAX_NESTING))))
    assert read_metadata(path)["llama.block_count"] == 2
    path.write_bytes(gguf_header(*llama_shape(2), gguf_field("deep", _ARR, nested_arrays(MAX_NESTING + 1))))
    with pytest.raises(ValueError, match="nested"):
        read_metadata(path)


# Hypothesis: any header, well formed or lying about its counts, lengths,
# types and nesting, cut anywhere.
KEYS = st.sampled_from(
    [
        "general.architecture",
        "llama.block_count",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.embedding_length",
        "llama.attention.key_length",
        "llama.attention.value_length",
        "tokenizer.ggml.tokens",
    ]
)
U64 = st.integers(0, (1 << 64) - 1)


def mostly(usual: st.SearchStrategy[T], other: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """Mostly `usual`: a header must get far enough for its lies to be read."""
    return st.integers(0, 7).flatmap(lambda pick: other if pick == 5 else usual)


KINDS = mostly(st.sampled_from([*_FORMATS, _STR, _ARR]), st.sampled_from([13, 0xFFFFFFFF]))


def scalar(kind: int) -> st.SearchStrategy[bytes]:
    fmt = "<" + _FORMATS[kind]
    if kind in (6, 12):
        return st.floats(width=32 if kind == 6 else 64).map(lambda v: struct.pack(fmt, v))
    if kind == 7:
        return st.integers(0, 255).map(lambda v: bytes([v]))
    size = struct.calcsize(fmt) * 8
    low, high = (-(1 << (size - 1)), (1 << (size - 1)) - 1) if fmt[1].islower() else (0, (1 << size) - 1)
    return st.integers(low, high).map(lambda v: struct.pack(fmt, v))


@st.composite
def value(draw: st.DrawFn, kind: int, depth: int = 0) -> bytes:
    """The bytes of a value of `kind` (an unknown kind: any bytes), its lengths and counts true or not."""
    if kind in _FORMATS:
        return draw(scalar(kind))
    if kind == _STR:
        text = draw(mostly(st.just(b"llama"), st.sampled_from([b"", b"\xff\xfe"]) | st.binary(max_size=12)))
        length = draw(mostly(st.just(len(text)), U64))
        return struct.pack("<Q", length) + text
    if kind == _ARR:
        if draw(st.booleans()):  # a chain of arrays, any depth
            return nested_arrays(draw(st.sampled_from([1, 2, 15, 16, 17, 3000])))
        inner = draw(KINDS if depth < 3 else st.sampled_from([_U8, _STR]))
        items = draw(st.lists(value(inner, depth + 1), max_size=3))
        count = draw(mostly(st.just(len(items)), U64))
        return struct.pack("<IQ", inner, count) + b"".join(items)
    return draw(st.binary(max_size=16))


INTEGERS = st.sampled_from([0, 1, 2, 3, 4, 5, 10, 11])


@st.composite
def field(draw: st.DrawFn) -> bytes:
    """One key and its value: mostly the keys the estimate reads, with their types or others."""
    key = draw(mostly(KEYS, st.binary(max_size=8).map(lambda b: b.decode("latin-1"))))
    if key == "general.architecture":
        kind = draw(mostly(st.just(_STR), KINDS))
    elif key.startswith("llama."):
        kind = draw(mostly(INTEGERS, KINDS))
    else:
        kind = draw(KINDS)
    return gguf_field(key, kind, draw(value(kind)))


class Header(bytes):
    """A drawn header, shown short: 3,000 nested arrays would make a repr of 138 kB."""

    def __repr__(self) -> str:
        return f"<a header of {len(self)} bytes: {bytes(self[:48])!r}...>"


@st.composite
def header(draw: st.DrawFn) -> Header:
    architecture = gguf_field("general.architecture", _STR, gguf_string("llama"))
    fields = [*draw(mostly(st.just([architecture]), st.just([]))), *draw(st.lists(field(), max_size=8))]
    keys = draw(mostly(st.just(len(fields)), U64))
    version = draw(mostly(st.sampled_from([2, 3]), st.integers(0, 0xFFFFFFFF)))
    data = gguf_header(*fields, keys=keys, version=version, tensors=draw(U64))
    cut = draw(mostly(st.none(), st.integers(0, len(data))))
    return Header(data if cut is None else data[:cut])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=header())
def test_finding_9_any_header_is_read_or_refused_with_a_value_error_and_the_estimate_is_bounded(
    tmp_path: Path, data: bytes
) -> None:
    path = tmp_path / "any.gguf"
    path.write_bytes(data)
    with contextlib.suppress(ValueError):  # refused, or read: nothing else
        read_metadata(path)
    kv_bytes_per_cell.cache_clear()  # the file changes at every example, the mtime perhaps not
    spec = llamacpp_spec(path)
    need = estimate_bytes(spec, spec.defaults)
    assert type(need) is int
    assert len(data) <= need <= MAX_ESTIMATE_BYTES


# Plan and Load on a real server: the same outcome for the same file. The
# llamacpp recipe reads the header (the command recipe does not); its
# llama-server is the fake backend, which needs only the file to exist.
def fake_llama_server(tmp_path: Path) -> Path:
    wrapper = tmp_path / "llama-server"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_BACKEND}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.parametrize(
    ("name", "outcome", "reason"),
    [
        pytest.param("nested-3000", pb.PLAN_OUTCOME_LOAD, None, id="nested-3000"),
        pytest.param(
            "block-count-2-62",
            pb.PLAN_OUTCOME_INSUFFICIENT_MEMORY,
            "INSUFFICIENT_MEMORY",
            id="block-count-2-62",
        ),
        pytest.param("array-count-u64-max", pb.PLAN_OUTCOME_LOAD, None, id="array-count-u64-max"),
    ],
)
async def test_finding_9_plan_and_load_agree_on_a_hostile_header(
    servers: ServerFactory, tmp_path: Path, name: str, outcome: int, reason: str | None
) -> None:
    path = tmp_path / f"{name}.gguf"
    path.write_bytes(HOSTILE[name])
    server = servers.start(
        llama_model("m", path), env={"LEMONADE_LLAMA_SERVER": str(fake_llama_server(tmp_path))}
    )
    async with connect(server.address) as client:
        told = await client.control.Plan(pb.PlanRequest(model="m"))
        assert told.outcome == outcome, told.message
        if reason is None:
            status = await client.ready("m")
            assert status.state == pb.MODEL_STATE_READY
            # The header could not be read: the file's size and the process's allowance, no KV cache.
            assert told.need_bytes == path.stat().st_size + PROCESS_OVERHEAD_BYTES
        else:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.load_all("m")
            assert (refused.value.code(), error_info(refused.value).reason) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                reason,
            )
            # The same figure in both: the ceiling, which int64 holds.
            assert told.need_bytes == MAX_ESTIMATE_BYTES
            assert f"({MAX_ESTIMATE_BYTES:,} bytes" in told.message
            assert f"({MAX_ESTIMATE_BYTES:,} bytes" in (refused.value.details() or "")
            assert not (await client.control.Status(pb.StatusRequest())).pool.models
