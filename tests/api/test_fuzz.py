"""Fuzzing every RPC against one real server (issue 9, deliverable 10).

Hypothesis builds requests for every method of ModelControl and Inference
generically, from the message descriptors (so a field added to the protos is
fuzzed with no change here): strings empty, huge, unicode, with NUL, close
to catalog names and exactly them; integers at their type's extremes; floats
including NaN, ±inf and -0.0; optional fields present or not; repeated fields
of random length; nested messages. Then raw bytes that are not valid
messages (random, truncated encodings, wrong wire types, over-long varints,
invalid UTF-8, deep nesting) go to every method of every service on the
server, Health and reflection included.

What must hold for every call (DESIGN.md "Errors", lesson 10):
- the status is never UNKNOWN nor INTERNAL, and every non-OK status of a
  lemonade.v1 method carries an ErrorInfo;
- the server process stays alive and Status answers after every call;
- a request the server rejects changes nothing: the pool's sequence, its
  models (state, pid, pin, options), the backends started and pins.json are
  as they were;
- what the protos document as invalid (a model name outside the name rule,
  client backend arguments no operator allowed, option and sampling values
  out of their documented ranges) is INVALID_ARGUMENT;
- bytes that do not decode are INVALID_ARGUMENT `MALFORMED_REQUEST`, and
  bytes that do decode never are.

Every call has a short deadline (DEADLINE_EXCEEDED is an allowed outcome) and
streams are cancelled after a few messages. The counts of outcomes by status
code and reason are printed at the end (`pytest -s tests/api/test_fuzz.py`).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from conftest import ServerFactory, fake_model, llama_model
from lemonade_grpc._gen.lemonade.v1 import inference_pb2, model_control_pb2, model_control_pb2_grpc
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.testing import ServerProcess as Server
from rpc_errors import bad_fields, error_info

pytestmark = pytest.mark.asyncio(loop_scope="module")

CATALOG = ("fake_a", "fake_b", "tiny")
CHAT_ROLES = ("system", "user", "assistant", "tool")
# Flags a hostile client would try: llama-server's shell and file writers,
# the flags lemonade-grpc sets itself, and the fake backend's faults.
BACKEND_FLAGS = (
    "--tools",
    "all",
    "--log-file",
    "/tmp/lemonade-fuzz-owned",
    "--port",
    "1",
    "--host",
    "0.0.0.0",
    "--model",
    "--api-key",
    "--po",
    "--fail-start",
    "--ignore-sigterm",
    "--load-seconds",
    "100",
    "--exit-after-seconds",
    "0",
    "-c",
    "--ctx-size",
    "=",
    "",
)
# The model name rule (DESIGN.md lesson 10: "names have one rule").
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

UNARY_SECONDS = 2.0
STREAM_SECONDS = 5.0
SETTLE_SECONDS = 15.0
STREAM_MESSAGES = 3  # Watch, Complete, Chat, Health.Watch: cancelled after this many
LOAD_MESSAGES = 64  # a Load is read to its end (or its deadline)
QUIET_SECONDS = 0.1  # a stream silent this long after its first message is cancelled
HUGE_LENGTHS = (1_025, 65_536, 1_000_000)

# Client-side outcomes, and failures of work that had started (the request
# was accepted, then the backend failed or another request cut it short):
# those may change the pool. Every other non-OK status is a rejection.
NOT_REJECTIONS = {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
STARTED_WORK_REASONS = {
    "BACKEND_REJECTED",  # the backend's own refusal of a prompt
    "BACKEND_START_FAILED",
    "BACKEND_CRASHED",
    "BACKEND_ERROR",
    "LOAD_CANCELLED",
    "MODEL_EVICTED",
}
FORBIDDEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

# (kind, code, reason) -> count; printed by the last test.
OUTCOMES: collections.Counter[tuple[str, str, str]] = collections.Counter()


def config(tmp: Path, tiny_model: Path) -> str:
    model_file = tmp / "fake.bin"
    model_file.write_bytes(b"fake weights")
    return (
        "[pool]\nmax_loaded = { llm = 2, embedding = 1 }\nidle_unload_seconds = 0\n"
        + fake_model("fake_a", model_file)
        + fake_model("fake_b", model_file, type_="embedding")
        + llama_model("tiny", tiny_model, ctx_size=512)
    )


@pytest.fixture(scope="module")
def fuzz_server(
    tmp_path_factory: pytest.TempPathFactory, llama_server_binary: Path, tiny_model: Path
) -> Iterator[Server]:
    """One server for the whole module; at the end, nothing it started may be left running."""
    tmp = tmp_path_factory.mktemp("fuzz")
    factory = ServerFactory(tmp)
    try:
        yield factory.start(config(tmp, tiny_model))
    finally:
        factory.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def channel(fuzz_server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(fuzz_server.address) as channel:
        yield channel


# --- Strategies built from message descriptors --------------------------------------------------

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# Values where ranges and derived times break: 2^24 (a context size), 7.9e9
# seconds (past year 2220: "Timestamp is not valid", issue 9 finding 4).
_INTERESTING_INTS: tuple[int, ...] = (
    0,
    1,
    -1,
    2,
    7,
    255,
    256,
    2**16,
    2**20,
    2**20 + 1,
    2**24,
    2**24 + 1,
    2**31 - 1,
    2**31,
)
_INTERESTING_INTS += (2**32 - 1, 7_900_000_000, 10**10, 2**53 + 1, 2**62, 2**63 - 1)
_INTERESTING_FLOATS = (
    math.nan,
    math.inf,
    -math.inf,
    -0.0,
    0.0,
    1.0,
    -1.0,
    1.0000001,
    0.9999999,
    2.0000002,
    -2.0000002,
    100.00001,
    10.000001,
    1e-45,
    3.4028235e38,
    -3.4028235e38,
    1e308,
)


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    """Integers of [low, high], with the type's extremes and the values around known limits often."""
    candidates = {*_INTERESTING_INTS, *(-value for value in _INTERESTING_INTS), low, high, low + 1, high - 1}
    edges = sorted(value for value in candidates if low <= value <= high)
    plain = st.integers(max(low, 0), min(high, 1000))  # ordinary values get a request past the checks
    return st.one_of(st.sampled_from(edges), st.integers(low, high), plain)


def floats(single: bool) -> st.SearchStrategy[float]:
    """Floats of every kind, single precision for `float` fields (what the wire can carry)."""
    any_float = st.floats(width=32) if single else st.floats()
    plain = st.floats(0.0, 1.0, width=32)  # ordinary values get a request past the checks
    return st.one_of(st.sampled_from(_INTERESTING_FLOATS), any_float, plain)


def near_names(names: Sequence[str]) -> st.SearchStrategy[str]:
    """Names that differ from a catalog name by a little: case, padding, NUL, a path, a homoglyph."""
    mutations: tuple[Callable[[str], str], ...] = (
        str.upper,
        lambda n: n + " ",
        lambda n: " " + n,
        lambda n: n + "\x00",
        lambda n: n + "\x00x",
        lambda n: n[:-1],
        lambda n: n + "x",
        lambda n: n + "\n",
        lambda n: "../" + n,
        lambda n: n + "/..",
        lambda n: n.replace("a", "\u0430"),  # Cyrillic a
        lambda n: n + "\u200b",  # zero-width space
        lambda n: n + "é",
        lambda n: "-" + n,
        lambda n: "." + n,
        lambda n: n * 2,
        lambda n: n + ":latest",
        lambda n: n + "_" * 130,  # over 128 characters
        lambda n: (n + "_" * 128)[:128],  # exactly 128: a valid name, not in the catalog
    )
    return st.builds(lambda name, mutate: mutate(name), st.sampled_from(names), st.sampled_from(mutations))


def huge_strings() -> st.SearchStrategy[str]:
    """Strings of 1 KiB to 1 MB, ASCII or not (a 1 MB name broke the trailers: issue 9, finding 9)."""
    return st.builds(
        lambda length, unit: (unit * length)[:length],
        st.sampled_from(HUGE_LENGTHS),
        st.sampled_from("aé\x00😀"),
    )


def strings(vocabulary: Sequence[str], allow_huge: bool) -> st.SearchStrategy[str]:
    choices = [
        st.just(""),
        st.sampled_from(vocabulary),
        near_names(CATALOG),
        st.text(max_size=40),
        st.text(st.characters(codec="ascii"), max_size=40),
    ]
    if allow_huge:
        choices.append(huge_strings())
    return st.one_of(choices)


# Per field name, values that get a request past the first checks often enough
# to reach the deeper ones (an exact model name, a valid role).
FIELD_HINTS: Mapping[str, st.SearchStrategy[Any]] = {
    "model": st.one_of(st.sampled_from(CATALOG), near_names(CATALOG)),
    "role": st.sampled_from(CHAT_ROLES),
    "args": st.sampled_from(BACKEND_FLAGS),
    "prompt": st.sampled_from(("Hello", "Once upon a time", " ")),
    "content": st.sampled_from(("Hello", "Tell me a story")),
}
# The same for ordinary requests, which should mostly be accepted.
ORDINARY_HINTS: Mapping[str, st.SearchStrategy[Any]] = {**FIELD_HINTS, "model": st.sampled_from(CATALOG)}
VOCABULARY = (*CATALOG, *CHAT_ROLES, *BACKEND_FLAGS)
ORDINARY_WORDS = ("hello", "world", "\n", "###")


def field_values(
    field: FieldDescriptor, depth: int, allow_huge: bool, hostile: bool
) -> st.SearchStrategy[Any]:
    """Values of one element of `field`: anything its type allows when `hostile`, else ordinary ones."""
    if not hostile:
        return _ordinary_values(field, depth)
    strategy: st.SearchStrategy[Any]
    if field.type == FieldDescriptor.TYPE_STRING:
        strategy = strings(VOCABULARY, allow_huge)
    elif field.type == FieldDescriptor.TYPE_BYTES:
        strategy = st.binary(max_size=1_000_000 if allow_huge else 256)
    elif field.type == FieldDescriptor.TYPE_BOOL:
        strategy = st.booleans()
    elif field.type in _INT_RANGES:
        strategy = integers(*_INT_RANGES[field.type])
    elif field.type == FieldDescriptor.TYPE_FLOAT:
        strategy = floats(single=True)
    elif field.type == FieldDescriptor.TYPE_DOUBLE:
        strategy = floats(single=False)
    elif field.type == FieldDescriptor.TYPE_ENUM:
        # proto3 enums are open: unknown numbers decode and reach the servicer.
        strategy = st.one_of(st.sampled_from(_enum_numbers(field)), integers(-(2**31), 2**31 - 1))
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        strategy = messages(field.message_type, depth + 1, allow_huge, hostile=True)
    else:  # pragma: no cover - groups are proto2 only
        raise AssertionError(f"unsupported field type {field.type} of {field.full_name}")
    hint = FIELD_HINTS.get(field.name)
    return st.one_of(hint, strategy) if hint is not None else strategy


def _ordinary_values(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """Values a well-meaning client would send: short words, small numbers, known enum values."""
    hint = ORDINARY_HINTS.get(field.name)
    if hint is not None:
        return hint
    if field.type == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(ORDINARY_WORDS), st.text(st.characters(codec="ascii"), min_size=1))
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=16)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type in _INT_RANGES:
        low, high = _INT_RANGES[field.type]
        return st.integers(max(low, 0), min(high, 4096))
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(0.0625, 1.0, width=32)  # both ends exact in single precision
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from(_enum_numbers(field))
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1, allow_huge=False, hostile=False)
    raise AssertionError(f"unsupported field type {field.type} of {field.full_name}")  # pragma: no cover


def _enum_numbers(field: FieldDescriptor) -> list[int]:
    assert field.enum_type is not None
    return [value.number for value in field.enum_type.values]


def requests(descriptor: Descriptor) -> st.SearchStrategy[Message]:
    """Requests of type `descriptor`: half hostile (anything the type allows), half ordinary.

    Ordinary ones get past validation and reach the pool and the backends,
    so that what a hostile field does there is tried too.
    """
    return st.one_of(messages(descriptor, hostile=True), messages(descriptor, hostile=False))


@functools.cache
def messages(
    descriptor: Descriptor, depth: int = 0, allow_huge: bool = True, hostile: bool = True
) -> st.SearchStrategy[Message]:
    """Messages of type `descriptor`, every field drawn by `field_values`.

    Huge strings appear in singular fields only, so a request stays under
    gRPC's 4 MiB receive limit (which the transport enforces before any
    servicer runs). Nesting stops at depth 4.
    """
    cls = message_factory.GetMessageClass(descriptor)
    longest = 24 if hostile else 4

    def values(field: FieldDescriptor, allow_huge: bool) -> st.SearchStrategy[Any]:
        return field_values(field, depth, allow_huge, hostile)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        oneofs_done: set[str] = set()
        for field in descriptor.fields:
            oneof = field.containing_oneof
            if oneof is not None:
                # At most one field of a oneof (proto3 `optional` is a oneof of one: presence).
                if oneof.full_name in oneofs_done:
                    continue
                oneofs_done.add(oneof.full_name)
                chosen = draw(st.sampled_from([None, *oneof.fields]))
                if chosen is not None:
                    _set(message, chosen, draw(values(chosen, allow_huge)))
                continue
            if field.is_repeated:
                _extend(message, field, draw(st.lists(values(field, False), max_size=longest)))
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                if depth < 4 and draw(st.booleans()):
                    _set(message, field, draw(values(field, allow_huge)))
            else:
                _set(message, field, draw(values(field, allow_huge)))
        return message

    return build()


def _set(message: Message, field: FieldDescriptor, value: Any) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _extend(message: Message, field: FieldDescriptor, values: list[Any]) -> None:
    container = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        # A map (a Struct's fields): each value drawn is an entry message.
        value_field = field.message_type.fields_by_name["value"]
        for entry in values:
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                container[entry.key].CopyFrom(entry.value)
            else:
                container[entry.key] = entry.value
        return
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        for value in values:
            container.add().CopyFrom(value)
    else:
        container.extend(values)


# --- Raw bytes ----------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


@functools.cache
def malformed_bytes(descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    """Bytes that are (mostly) not a valid encoding of `descriptor`: the decoder's edge cases."""
    numbers = [field.number for field in descriptor.fields] or [1]
    number = st.sampled_from(numbers)
    wrong_wire_type = st.builds(
        lambda n, wire, tail: _tag(n, wire) + tail,
        number,
        st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]),
        st.binary(max_size=16),
    )
    overlong_varint = st.builds(lambda n: _tag(n, 0) + b"\xff" * 10 + b"\x01", number)
    overlong_tag = st.just(b"\xff" * 11 + b"\x01")
    bad_length = st.builds(
        lambda n, length, body: _tag(n, 2) + _varint(length) + body,
        number,
        st.sampled_from([1, 100, 2**31 - 1, 2**32, 2**63]),
        st.binary(max_size=8),
    )
    invalid_utf8 = st.builds(
        lambda n, body: _tag(n, 2) + _varint(len(body)) + body,
        number,
        st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"a\x80b", b"\xf8\x88\x80\x80\x80"]),
    )
    field_zero = st.builds(lambda tail: b"\x00" + tail, st.binary(max_size=8))
    # Unknown groups nested past the decoder's recursion limit.
    deep_groups = st.builds(
        lambda depth: _tag(99, 3) * depth + _tag(99, 4) * depth, st.sampled_from([101, 1000])
    )
    truncated = st.builds(
        lambda valid, cut: valid[: max(0, len(valid) - cut)],
        messages(descriptor, allow_huge=False).map(lambda m: m.SerializeToString()),
        st.integers(1, 8),
    )
    return st.one_of(
        st.binary(min_size=1, max_size=64),
        wrong_wire_type,
        overlong_varint,
        overlong_tag,
        bad_length,
        invalid_utf8,
        field_zero,
        deep_groups,
        truncated,
    )


# --- Calls and their outcomes -------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One RPC: its path, shapes and request type."""

    path: str
    request: Descriptor
    request_streaming: bool
    response_streaming: bool

    @property
    def ours(self) -> bool:
        return self.path.startswith("/lemonade.v1.")

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[1]


def methods_of(service_descriptor: Any) -> list[Method]:
    return [
        Method(
            f"/{service_descriptor.full_name}/{method.name}",
            method.input_type,
            method.client_streaming,
            method.server_streaming,
        )
        for method in service_descriptor.methods
    ]


OUR_METHODS = [
    *methods_of(model_control_pb2.DESCRIPTOR.services_by_name["ModelControl"]),
    *methods_of(inference_pb2.DESCRIPTOR.services_by_name["Inference"]),
]
ALL_METHODS = [
    *OUR_METHODS,
    *methods_of(health_pb2.DESCRIPTOR.services_by_name["Health"]),
    *methods_of(reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]),
]


@dataclass(frozen=True)
class Outcome:
    """How a call ended: its code, ErrorInfo reason (if any), BadRequest fields and messages read."""

    code: grpc.StatusCode
    reason: str
    details: str
    fields: tuple[str, ...]
    messages: int
    cancelled_by_us: bool = False


# gRPC refuses a request over its 4 MiB receive limit itself, before our code runs: no ErrorInfo
# (api.md, "Inference"). Many fields of up to 1 MB each can add up to that.
GRPC_RECEIVE_LIMIT = 4 << 20
GRPC_TOO_LARGE = "(gRPC's receive limit)"


def _outcome(error: grpc.aio.AioRpcError, method: Method, messages: int) -> Outcome:
    code = error.code()
    reason = ""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Received message larger than max" in (
        error.details() or ""
    ):
        reason = GRPC_TOO_LARGE
    elif code not in NOT_REJECTIONS and code not in FORBIDDEN:
        if method.ours:
            reason = error_info(error).reason  # fails the example when there is none
        else:
            status = rpc_status.from_call(error)  # type: ignore[arg-type]
            reason = "(no ErrorInfo)" if status is None else _reason(status)
    return Outcome(code, reason, error.details() or "", tuple(bad_fields(error)), messages)


def _reason(status: Any) -> str:
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return "(no ErrorInfo)"


async def invoke(channel: grpc.aio.Channel, method: Method, request: bytes) -> Outcome:
    """Send `request` (already encoded) to `method`; read a stream's first messages, then cancel it."""
    timeout = STREAM_SECONDS if method.response_streaming else UNARY_SECONDS
    limit = LOAD_MESSAGES if method.name == "Load" else STREAM_MESSAGES
    messages = 0
    # Raw bytes both ways: no serializers, so grpc's stubs cannot type these calls.
    raw_channel: Any = channel
    try:
        if not method.response_streaming:
            if method.request_streaming:
                await raw_channel.stream_unary(method.path)(iter([request]), timeout=timeout)
            else:
                await raw_channel.unary_unary(method.path)(request, timeout=timeout)
            return Outcome(grpc.StatusCode.OK, "", "", (), 1)
        call: Any
        if method.request_streaming:
            call = raw_channel.stream_stream(method.path)(iter([request]), timeout=timeout)
        else:
            call = raw_channel.unary_stream(method.path)(request, timeout=timeout)
        while messages < limit:
            try:
                # The first message may wait for a load; later ones come at
                # once or not at all (Watch waits for events that never come).
                message = await asyncio.wait_for(call.read(), timeout if not messages else QUIET_SECONDS)
            except TimeoutError:
                break
            if message is grpc.aio.EOF:
                return Outcome(grpc.StatusCode.OK, "", "", (), messages)
            messages += 1
        call.cancel()
        return Outcome(grpc.StatusCode.CANCELLED, "", "", (), messages, cancelled_by_us=True)
    except grpc.aio.AioRpcError as error:
        return _outcome(error, method, messages)


@dataclass(frozen=True)
class Fingerprint:
    """What a rejected request must not change."""

    sequence: int
    models: tuple[tuple[str, int, int, bool, bytes], ...]
    backends_started: int
    pins: bytes | None


def fingerprint(status: pb.StatusResponse, state_dir: Path) -> Fingerprint:
    pool = status.pool
    models = tuple(
        sorted(
            (m.name, m.state, m.pid, m.pinned, m.options.SerializeToString(deterministic=True))
            for m in pool.models
        )
    )
    pins_file = state_dir / "pins.json"
    pins = pins_file.read_bytes() if pins_file.exists() else None
    return Fingerprint(pool.sequence, models, pool.backends_started, pins)


def _busy(pool: pb.PoolStatus) -> str | None:
    """What keeps the pool from being quiescent, or None."""
    if pool.HasField("load_in_flight") or pool.queue:
        return "a load in flight"
    for model in pool.models:
        if model.state in (pb.MODEL_STATE_LOADING, pb.MODEL_STATE_UNLOADING):
            return f"{model.name} {pb.ModelState.Name(model.state)}"
        if model.in_flight:
            return f"{model.name} has {model.in_flight} stream(s) in flight"
    return None


async def settled(control: Any, server: Server, after: str) -> pb.StatusResponse:
    """Status once the pool is quiescent (no load, no transitional model, no stream in flight).

    Fails naming `after` when Status does not answer OK or the pool stays
    busy for SETTLE_SECONDS: either is a failure of the request before.
    """
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        assert server.process.poll() is None, f"the server died after {after}:\n{server.log()[-3000:]}"
        try:
            status: pb.StatusResponse = await control.Status(pb.StatusRequest(), timeout=UNARY_SECONDS)
        except grpc.aio.AioRpcError as error:
            pytest.fail(f"Status answered {error.code().name} {error.details()!r} after {after}")
        busy = _busy(status.pool)
        if busy is None:
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"the pool stayed busy ({busy}) for {SETTLE_SECONDS:g} s after {after}")
        await asyncio.sleep(0.02)


async def reset(control: Any, server: Server) -> pb.StatusResponse:
    """A quiescent pool where nothing will change on its own; unloads what would idle-unload.

    A model left with an idle timer (a fuzzed Load may set one) would unload
    in the middle of a later example and look like a change that example made.
    A Status that fails (a previous example's damage) is cleared by unloading
    everything, so one failure does not fail every later example.
    """
    try:
        status = await settled(control, server, "the previous example")
    except BaseException:
        await control.Unload(pb.UnloadRequest(), timeout=SETTLE_SECONDS)
        return await settled(control, server, "unloading every model")
    timed = [m.name for m in status.pool.models if m.HasField("idle_unload_at")]
    for name in timed:
        await control.Unload(pb.UnloadRequest(model=name), timeout=SETTLE_SECONDS)
    return await settled(control, server, "unloading idle-timed models") if timed else status


def _valid_name(name: str) -> bool:
    return MODEL_NAME.fullmatch(name) is not None


def _in(value: float, low: float, high: float, *, low_open: bool = False) -> bool:
    return math.isfinite(value) and (value > low if low_open else value >= low) and value <= high


# The ranges the protos document for sampling fields (inference.proto).
_SAMPLING_RANGES = {
    "temperature": (0.0, 100.0, False),
    "top_p": (0.0, 1.0, True),
    "min_p": (0.0, 1.0, False),
    "repeat_penalty": (0.0, 10.0, False),
    "presence_penalty": (-2.0, 2.0, False),
    "frequency_penalty": (-2.0, 2.0, False),
}


def documented_invalid(method: Method, request: Message) -> list[str]:
    """Why the protos' own documentation makes `request` invalid (empty when it says nothing against it).

    A request listed here must be INVALID_ARGUMENT (or NOT_FOUND for a
    well-formed name outside the catalog, which a server may check first).
    The server may reject more than this; it may not accept any of it.
    """
    problems: list[str] = []
    model = getattr(request, "model", None)
    if isinstance(model, str) and (model or method.name != "Unload") and not _valid_name(model):
        problems.append(f"model name {model[:40]!r} breaks the name rule")
    if isinstance(request, pb.LoadRequest) and request.HasField("options"):
        options = request.options
        if options.HasField("ctx_size") and options.ctx_size < 1:
            problems.append("ctx_size < 1")
        if options.HasField("idle_unload_seconds") and options.idle_unload_seconds < 0:
            problems.append("idle_unload_seconds < 0")
        if options.HasField("backend_args") and options.backend_args.args:
            problems.append("backend args that no operator allowed")
    if isinstance(request, pb.PinRequest) and not request.HasField("pinned"):
        problems.append("Pin without pinned")
    if isinstance(request, inference_pb2.CompleteRequest | inference_pb2.ChatRequest):
        if isinstance(request, inference_pb2.CompleteRequest) and not request.prompt:
            problems.append("empty prompt")
        if isinstance(request, inference_pb2.ChatRequest):
            if not request.messages:
                problems.append("no messages")
            problems += [f"role {m.role!r}" for m in request.messages if m.role not in CHAT_ROLES]
        if request.HasField("max_tokens") and not 1 <= request.max_tokens <= 1 << 20:
            problems.append(f"max_tokens {request.max_tokens}")
        message: Message = request  # the stubs type HasField for literal names only
        for name, (low, high, low_open) in _SAMPLING_RANGES.items():
            if message.HasField(name) and not _in(getattr(request, name), low, high, low_open=low_open):
                problems.append(f"{name} {getattr(request, name)}")
        if request.HasField("top_k") and request.top_k < 0:
            problems.append(f"top_k {request.top_k}")
        if len(request.stop) > 16 or any(not s for s in request.stop):
            problems.append("stop strings")
    return problems


def _show(request: Message | bytes) -> str:
    text = repr(request) if isinstance(request, bytes) else f"{type(request).__name__}({str(request)!r})"
    return text if len(text) <= 400 else text[:400] + f"… ({len(text):,} characters)"


async def check_call(
    channel: grpc.aio.Channel, server: Server, method: Method, request: Message | bytes
) -> Outcome:
    """Call `method` with `request` on a quiescent pool and check every rule of the module docstring."""
    control = model_control_pb2_grpc.ModelControlStub(channel)
    before = fingerprint(await reset(control, server), server.state_dir)
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    decoded = _decode(method, raw)
    outcome = await invoke(channel, method, raw)
    kind = "raw" if isinstance(request, bytes) else "typed"
    OUTCOMES[
        kind, outcome.code.name + (" (by the client)" if outcome.cancelled_by_us else ""), outcome.reason
    ] += 1
    shown = f"{method.path} {_show(request)}"
    note(f"{shown} -> {outcome}")

    assert outcome.code not in FORBIDDEN, f"{shown} answered {outcome.code.name}: {outcome.details[:300]!r}"
    if outcome.reason == GRPC_TOO_LARGE or len(raw) > GRPC_RECEIVE_LIMIT:
        # Over the limit, and only then, gRPC's own refusal.
        assert (outcome.reason == GRPC_TOO_LARGE) == (len(raw) > GRPC_RECEIVE_LIMIT), (shown, len(raw))
        return outcome
    if len(outcome.details.encode()) > 1024:
        pytest.fail(f"{shown} answered a {len(outcome.details.encode()):,}-byte message")
    if decoded is None:
        assert (outcome.code, outcome.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST"), (
            f"undecodable {shown} answered {outcome.code.name} {outcome.reason}"
        )
    else:
        assert outcome.reason != "MALFORMED_REQUEST", f"{shown} decodes, yet answered MALFORMED_REQUEST"
        if method.ours:
            problems = documented_invalid(method, decoded)
            allowed = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
            if problems and outcome.code not in allowed:
                pytest.fail(
                    f"{shown} is invalid ({'; '.join(problems)}) yet answered {outcome.code.name}"
                    f" {outcome.reason} {outcome.details[:200]!r}"
                )
            if problems and outcome.code == grpc.StatusCode.NOT_FOUND:
                # NOT_FOUND is for a well-formed name the catalog lacks, checked before the rest.
                assert _valid_name(getattr(decoded, "model", "")), (
                    f"{shown} ({'; '.join(problems)}) answered NOT_FOUND"
                )
    after = await settled(control, server, shown)
    rejected = outcome.code not in NOT_REJECTIONS and outcome.reason not in STARTED_WORK_REASONS
    if rejected:
        changed = fingerprint(after, server.state_dir)
        assert changed == before, (
            f"{shown} was rejected ({outcome.code.name} {outcome.reason}) but changed the pool:"
            f"\nbefore {before}\nafter  {changed}"
        )
    return outcome


def _decode(method: Method, raw: bytes) -> Message | None:
    """`raw` decoded as `method`'s request type (as the server sees it); None when it does not decode."""
    try:
        return message_factory.GetMessageClass(method.request).FromString(raw)
    except DecodeError:
        return None


# --- The tests ----------------------------------------------------------------------------------

# A few hundred calls in all: the search is broad, not deep, and keeps the
# module well under a minute. Status and ListModels take no fields: one example.
EXAMPLES = 50  # per typed RPC
RAW_EXAMPLES = 20  # per method, 12 methods
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # Requests with 1 MB strings are big and slow to build on purpose.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("method", OUR_METHODS, ids=lambda m: m.name)
@FUZZ_SETTINGS
@given(data=st.data())
async def test_fuzzed_requests_never_get_unknown_or_internal_and_rejections_change_nothing(
    method: Method, fuzz_server: Server, channel: grpc.aio.Channel, data: st.DataObject
) -> None:
    request = data.draw(requests(method.request), label="request")
    await check_call(channel, fuzz_server, method, request)


@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: m.path.rsplit(".", 1)[1].replace("/", "."))
@settings(FUZZ_SETTINGS, max_examples=RAW_EXAMPLES)
@given(data=st.data())
async def test_malformed_bytes_get_malformed_request_on_every_method(
    method: Method, fuzz_server: Server, channel: grpc.aio.Channel, data: st.DataObject
) -> None:
    raw = data.draw(malformed_bytes(method.request), label="raw")
    await check_call(channel, fuzz_server, method, raw)


async def test_the_server_survived_the_fuzz(fuzz_server: Server, channel: grpc.aio.Channel) -> None:
    await settled(model_control_pb2_grpc.ModelControlStub(channel), fuzz_server, "the whole fuzz run")
    assert fuzz_server.process.poll() is None
    width = max((len(f"{code} {reason}") for _, code, reason in OUTCOMES), default=0)
    print(f"\nfuzz outcomes ({sum(OUTCOMES.values())} calls):")
    for (kind, code, reason), count in sorted(OUTCOMES.items()):
        print(f"  {kind:5} {f'{code} {reason}':{width}} {count:5}")
