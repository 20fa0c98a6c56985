"""The API layer's error contract (issue 9): no request gets UNKNOWN, or an error without ErrorInfo.

Regression tests named after the issue's findings, against a real server
where the finding was seen there, and in-process (a grpc.aio server in the
test's own loop) for the wrappers and the interceptor, whose every case a
real server cannot be made to hit on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2

from conftest import eventually
from lemonade_grpc._gen.lemonade.v1 import inference_pb2, inference_pb2_grpc
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.api import errors
from lemonade_grpc.api.inference import Inference
from lemonade_grpc.api.interceptors import MalformedRequestInterceptor
from lemonade_grpc.backends.http import BackendConnectionError
from lemonade_grpc.core.errors import InvalidRequest, ModelEvicted
from lemonade_grpc.core.settings import Limits
from lemonade_grpc.pool.pool import Pool
from lemonade_grpc.testing import ServerProcess as Server
from rpc_errors import bad_fields, error_info

# Neither a LoadRequest nor any other message: field 31, wire type 7 (no such type).
MALFORMED = b"\xff\x01\x00"
MESSAGE = health_pb2.HealthCheckRequest  # a message with one string field, for in-process services


# --- Finding 10: malformed protobuf bytes answered UNKNOWN "Unexpected DecodeError" -------------


async def _drain(channel: grpc.aio.Channel, path: str, shape: str, payloads: list[bytes]) -> list[bytes]:
    """Call `path` (of `shape`) with raw `payloads` (one for a unary request); return every reply."""
    raw: Any = channel  # no serializers: bytes both ways, which grpc's stubs cannot type
    if shape == "unary_unary":
        return [await raw.unary_unary(path)(payloads[0], timeout=10)]
    if shape == "unary_stream":
        return [reply async for reply in raw.unary_stream(path)(payloads[0], timeout=10)]
    if shape == "stream_unary":
        return [await raw.stream_unary(path)(iter(payloads), timeout=10)]
    return [reply async for reply in raw.stream_stream(path)(iter(payloads), timeout=10)]


async def _raw_call(channel: grpc.aio.Channel, path: str, shape: str, payload: bytes) -> grpc.aio.AioRpcError:
    """Send `payload` as the request of `path` (of `shape`) and return the error it ends with."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _drain(channel, path, shape, [payload])
    return raised.value


def _assert_malformed(error: grpc.aio.AioRpcError, what: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {error.code()} {error.details()}"
    assert error_info(error).reason == "MALFORMED_REQUEST", what
    assert len((error.details() or "").encode()) <= errors.MAX_MESSAGE_BYTES


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        ("/lemonade.v1.ModelControl/Status", "unary_unary"),
        ("/lemonade.v1.ModelControl/Unload", "unary_unary"),
        ("/lemonade.v1.ModelControl/Load", "unary_stream"),
        ("/lemonade.v1.Inference/Complete", "unary_stream"),
        ("/grpc.health.v1.Health/Check", "unary_unary"),
        ("/grpc.health.v1.Health/Watch", "unary_stream"),
        ("/grpc.health.v1.Health/List", "unary_unary"),  # a sync handler in grpc's aio servicer
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream_stream"),
    ],
)
async def test_malformed_protobuf_bytes_get_invalid_argument_with_error_info(
    server: Server, path: str, shape: str
) -> None:
    async with grpc.aio.insecure_channel(server.address) as channel:
        _assert_malformed(await _raw_call(channel, path, shape, MALFORMED), path)
        # The server goes on serving well-formed requests.
        control: Any = channel
        status = await control.unary_unary("/lemonade.v1.ModelControl/Status")(b"", timeout=10)
        assert pb.StatusResponse.FromString(status).pool.slots


@contextlib.asynccontextmanager
async def in_process(handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> AsyncIterator[grpc.aio.Channel]:
    """A grpc.aio server in this loop serving `handlers` as service `test.Service`, with the interceptor."""
    server = grpc.aio.server(interceptors=[MalformedRequestInterceptor()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Service", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


def _echo_handlers() -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """Echo services of every shape and every handler kind grpc.aio runs: coroutine, async generator, sync."""

    async def unary_async(request: Any, context: Any) -> Any:
        return request

    def unary_sync(request: Any, context: Any) -> Any:
        return request

    async def server_stream_async(request: Any, context: Any) -> AsyncIterator[Any]:
        yield request
        yield request

    async def server_stream_writer(request: Any, context: Any) -> None:
        await context.write(request)

    def server_stream_sync(request: Any, context: Any) -> Iterator[Any]:
        yield request
        yield request

    async def client_stream_async(requests: AsyncIterator[Any], context: Any) -> Any:
        names = [request.service async for request in requests]
        return MESSAGE(service="+".join(names))

    def client_stream_sync(requests: Iterator[Any], context: Any) -> Any:
        return MESSAGE(service="+".join(request.service for request in requests))

    async def bidi_async(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            yield request

    def bidi_sync(requests: Iterator[Any], context: Any) -> Iterator[Any]:
        yield from requests

    behaviours: dict[str, Callable[..., Any]] = {
        "UnaryAsync": unary_async,
        "UnarySync": unary_sync,
        "ServerStreamAsync": server_stream_async,
        "ServerStreamWriter": server_stream_writer,
        "ServerStreamSync": server_stream_sync,
        "ClientStreamAsync": client_stream_async,
        "ClientStreamSync": client_stream_sync,
        "BidiAsync": bidi_async,
        "BidiSync": bidi_sync,
    }
    return {name: _handler(SHAPES[name], behaviour) for name, behaviour in behaviours.items()}


_CONSTRUCTORS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def _handler(shape: str, behaviour: Callable[..., Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of `shape` running `behaviour` on MESSAGE requests and replies."""
    constructor: Any = _CONSTRUCTORS[shape]
    handler: grpc.RpcMethodHandler[Any, Any] = constructor(
        behaviour, request_deserializer=MESSAGE.FromString, response_serializer=MESSAGE.SerializeToString
    )
    return handler


SHAPES = {
    "UnaryAsync": "unary_unary",
    "UnarySync": "unary_unary",
    "ServerStreamAsync": "unary_stream",
    "ServerStreamWriter": "unary_stream",
    "ServerStreamSync": "unary_stream",
    "ClientStreamAsync": "stream_unary",
    "ClientStreamSync": "stream_unary",
    "BidiAsync": "stream_stream",
    "BidiSync": "stream_stream",
}


@pytest.mark.parametrize("method", sorted(SHAPES))
async def test_malformed_bytes_get_malformed_request_on_every_handler_shape_and_kind(method: str) -> None:
    path, shape = f"/test.Service/{method}", SHAPES[method]
    good = MESSAGE(service="ok").SerializeToString()
    async with in_process(_echo_handlers()) as channel:
        _assert_malformed(await _raw_call(channel, path, shape, MALFORMED), path)
        # Well-formed requests are served as before.
        replies = await _drain(channel, path, shape, [good, good])
        if shape == "stream_unary":
            assert MESSAGE.FromString(replies[0]).service == "ok+ok"
        else:
            assert replies
            assert set(replies) == {good}
        # In a request stream, the first message that does not decode ends the call.
        if shape in ("stream_unary", "stream_stream"):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _drain(channel, path, shape, [good, MALFORMED, good])
            _assert_malformed(raised.value, f"{path} (second message)")


# --- Finding 9: a 1 MB model name got RESOURCE_EXHAUSTED "received metadata size exceeds hard limit"


@pytest.mark.parametrize("unit", ["a", "é", "\x00"])
async def test_a_one_megabyte_model_name_gets_a_bounded_status(server: Server, unit: str) -> None:
    name = unit * 1_000_000
    chat = [inference_pb2.ChatMessage(role="user", content="hi")]
    requests: dict[str, tuple[str, Message]] = {
        "/lemonade.v1.ModelControl/Load": ("unary_stream", pb.LoadRequest(model=name)),
        "/lemonade.v1.ModelControl/Unload": ("unary_unary", pb.UnloadRequest(model=name)),
        "/lemonade.v1.ModelControl/Pin": ("unary_unary", pb.PinRequest(model=name, pinned=True)),
        "/lemonade.v1.Inference/Complete": (
            "unary_stream",
            inference_pb2.CompleteRequest(model=name, prompt="hi"),
        ),
        "/lemonade.v1.Inference/Chat": ("unary_stream", inference_pb2.ChatRequest(model=name, messages=chat)),
    }
    async with grpc.aio.insecure_channel(server.address) as channel:
        for path, (shape, request) in requests.items():
            error = await _raw_call(channel, path, shape, request.SerializeToString())
            # NOT_FOUND today; INVALID_ARGUMENT once names have a length rule. Never
            # RESOURCE_EXHAUSTED "received metadata size exceeds hard limit".
            assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
                f"{path}: {error.code()} {(error.details() or '')[:200]}"
            )
            assert error_info(error).reason, path
            assert len((error.details() or "").encode()) <= errors.MAX_MESSAGE_BYTES, path


def test_status_messages_are_cut_to_1_kib_at_a_character_boundary() -> None:
    assert errors.bounded("short") == "short"
    exact = "a" * errors.MAX_MESSAGE_BYTES
    assert errors.bounded(exact) == exact
    for unit in ("a", "é", "😀", "\x00"):
        cut = errors.bounded(unit * 1_000_000)
        assert len(cut.encode()) <= errors.MAX_MESSAGE_BYTES, unit
        assert cut.endswith("…"), unit
        assert cut[:-1] == unit * (len(cut) - 1), unit
    # A lone surrogate (a file name's undecodable byte) cannot be sent as UTF-8: "?" instead.
    assert errors.bounded("bad \udcff name") == "bad ? name"

    # The message travels in grpc-message and again in the details trailer
    # (the Status and the BadRequest's description): each copy is cut.
    status = errors.to_status(InvalidRequest("é" * 1_000_000, field="model"))
    assert len(status.details.encode()) <= errors.MAX_MESSAGE_BYTES
    details = status_pb2.Status.FromString(
        cast(bytes, dict(status.trailing_metadata)["grpc-status-details-bin"])
    )
    bad_request = error_details_pb2.BadRequest()
    assert details.details[1].Unpack(bad_request)
    assert len(bad_request.field_violations[0].description.encode()) <= errors.MAX_MESSAGE_BYTES


# --- Findings 4 and 7: exceptions escaping a servicer answered UNKNOWN -------------------------


def _caused_by(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


RAISED: dict[str, Callable[[], BaseException]] = {
    "emfile": lambda: OSError(errno.EMFILE, "Too many open files"),
    "enfile": lambda: OSError(errno.ENFILE, "Too many open files in system"),
    "enomem": lambda: OSError(errno.ENOMEM, "Cannot allocate memory"),
    "enobufs": lambda: OSError(errno.ENOBUFS, "No buffer space available"),
    "client_os_error": lambda: _caused_by(
        BackendConnectionError("the backend closed the connection"),
        OSError(errno.EMFILE, "Too many open files"),
    ),
    "connector": lambda: BackendConnectionError(
        "cannot connect to http://127.0.0.1:1", OSError(errno.EMFILE, "Too many open files")
    ),
    "timestamp": lambda: ValueError("Timestamp is not valid: Seconds 4611686020222972855 must be in range"),
    "permission": lambda: PermissionError(errno.EACCES, "Permission denied", "/etc/secret"),
    "key": lambda: KeyError("no such thing"),
}
EXPECTED = {
    "emfile": (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_RESOURCES_EXHAUSTED"),
    "enfile": (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_RESOURCES_EXHAUSTED"),
    "enomem": (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_RESOURCES_EXHAUSTED"),
    "enobufs": (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_RESOURCES_EXHAUSTED"),
    "client_os_error": (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_RESOURCES_EXHAUSTED"),
    "connector": (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_RESOURCES_EXHAUSTED"),
    "timestamp": (grpc.StatusCode.INTERNAL, "INTERNAL_ERROR"),
    "permission": (grpc.StatusCode.INTERNAL, "INTERNAL_ERROR"),
    "key": (grpc.StatusCode.INTERNAL, "INTERNAL_ERROR"),
}


class Raising:
    """A servicer whose methods raise what the request's `service` field names, behind errors.unary/stream."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    @errors.unary
    async def Unary(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request.service == "abort":
            await context.abort(grpc.StatusCode.NOT_FOUND, "aborted by the servicer")
        raise RAISED[request.service]()

    @errors.stream
    async def Stream(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncGenerator[Any, None]:
        yield request
        if request.service == "abort":
            await context.abort(grpc.StatusCode.NOT_FOUND, "aborted by the servicer")
        if request.service == "wait":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        raise RAISED[request.service]()


def _raising_handlers(servicer: Raising) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    return {
        "Unary": _handler("unary_unary", servicer.Unary),
        "Stream": _handler("unary_stream", servicer.Stream),
    }


@pytest.mark.parametrize("raised", sorted(RAISED))
async def test_an_exception_escaping_a_servicer_gets_a_status_with_error_info_never_unknown(
    raised: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 4 (UNKNOWN "Timestamp is not valid") and finding 7 (Status UNKNOWN out of fds)."""
    code, reason = EXPECTED[raised]
    request = MESSAGE(service=raised).SerializeToString()
    async with in_process(_raising_handlers(Raising())) as channel:
        raw: Any = channel
        for shape in ("unary_unary", "unary_stream"):
            path = "/test.Service/Unary" if shape == "unary_unary" else "/test.Service/Stream"
            error = await _raw_call(channel, path, shape, request)
            assert (error.code(), error_info(error).reason) == (code, reason), f"{shape}: {error.details()}"
            details = error.details() or ""
            if code == grpc.StatusCode.INTERNAL:
                # Nothing of the exception reaches the client (it may quote the host or the request).
                assert details == errors.INTERNAL_MESSAGE
            else:
                assert "Too many open files" in details or "memory" in details or "buffer" in details
        # The stream delivered its message before the error.
        call = raw.unary_stream("/test.Service/Stream")(request, timeout=10)
        assert await call.read() == request
        with pytest.raises(grpc.aio.AioRpcError):
            await call.read()
    if code == grpc.StatusCode.INTERNAL:
        tracebacks = [r for r in caplog.records if r.name == errors.__name__ and r.exc_info]
        assert tracebacks, "an internal error is logged with its traceback"


async def test_an_abort_or_a_cancellation_passes_through_the_wrappers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    servicer = Raising()
    async with in_process(_raising_handlers(servicer)) as channel:
        abort = MESSAGE(service="abort").SerializeToString()
        for shape, path in (("unary_unary", "/test.Service/Unary"), ("unary_stream", "/test.Service/Stream")):
            error = await _raw_call(channel, path, shape, abort)
            assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, "aborted by the servicer")

        raw: Any = channel
        call = raw.unary_stream("/test.Service/Stream")(
            MESSAGE(service="wait").SerializeToString(), timeout=10
        )
        assert await call.read() is not grpc.aio.EOF
        call.cancel()
        await eventually(servicer.cancelled.is_set, 5, "the servicer to see its cancellation")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == errors.__name__]


# --- Finding 7: a healthy backend's stream ended UNAVAILABLE/BACKEND_CRASHED "Too many open files"


class _FailingClient:
    def __init__(self, error: BaseException) -> None:
        self._error = error

    async def stream(
        self, path: str, payload: object, on_open: object = None, headers: object = None, interval: float = 0
    ) -> AsyncIterator[list[object]]:
        raise self._error
        yield []  # pragma: no cover - makes this an async generator


class _OneLeasePool:
    """Stands in for `Pool` in `Inference`: every lease is `lease`, whose backend fails with `error`."""

    def __init__(self, error: BaseException, revoked: BaseException | None = None) -> None:
        self.catalog: dict[str, object] = {}
        self.limits = Limits()
        self.lease_object = SimpleNamespace(
            backend=SimpleNamespace(client=_FailingClient(error)), revoked=revoked, on_revoke=lambda cut: None
        )
        self.refusals: list[str] = []  # the models `refused` was told of, once per refused try

    def refused(self, name: str, lease: SimpleNamespace) -> None:
        assert lease is self.lease_object
        self.refusals.append(name)

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[SimpleNamespace]:
        yield self.lease_object


@pytest.mark.parametrize(
    ("error", "revoked", "code", "reason"),
    [
        (RAISED["connector"](), None, grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_RESOURCES_EXHAUSTED"),
        (RAISED["client_os_error"](), None, grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_RESOURCES_EXHAUSTED"),
        (
            BackendConnectionError("cannot connect", ConnectionRefusedError(errno.ECONNREFUSED, "refused")),
            None,
            grpc.StatusCode.UNAVAILABLE,
            "BACKEND_CRASHED",
        ),
        # Why the pool broke the stream wins over how the connection failed.
        (RAISED["connector"](), ModelEvicted("evicted"), grpc.StatusCode.ABORTED, "MODEL_EVICTED"),
    ],
    ids=["connector-emfile", "client-os-emfile", "refused", "revoked"],
)
async def test_a_backend_connection_failing_for_lack_of_file_descriptors_is_not_a_backend_crash(
    error: BaseException, revoked: BaseException | None, code: grpc.StatusCode, reason: str
) -> None:
    server = grpc.aio.server(interceptors=[MalformedRequestInterceptor()])
    pool = _OneLeasePool(error, revoked)
    inference_pb2_grpc.add_InferenceServicer_to_server(Inference(cast(Pool, pool)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in stub.Complete(
                    inference_pb2.CompleteRequest(model="tiny", prompt="hi"), timeout=10
                ):
                    pass
    finally:
        await server.stop(None)
    assert (raised.value.code(), error_info(raised.value).reason) == (code, reason), raised.value.details()
    assert not bad_fields(raised.value)
    # A refused connection is a crash the pool is told of, and the request is tried once more:
    # refused again, it ends BACKEND_CRASHED. Other failures are not retried.
    refused = isinstance(getattr(error, "os_error", None), ConnectionRefusedError) and revoked is None
    assert pool.refusals == (["tiny", "tiny"] if refused else [])


def test_only_an_errno_of_resource_exhaustion_counts_as_one() -> None:
    assert errors.exhausted_resource(OSError(errno.EMFILE, "x")) is not None
    assert errors.exhausted_resource(OSError(errno.ECONNREFUSED, "x")) is None
    assert errors.exhausted_resource(ValueError("x")) is None
    wrapped = RuntimeError("spawn failed")
    wrapped.__cause__ = OSError(errno.ENOMEM, "Cannot allocate memory")
    assert errors.exhausted_resource(wrapped) is wrapped.__cause__
    # The context of an error raised while handling another is not its cause.
    unrelated = ValueError("unrelated")
    unrelated.__context__ = OSError(errno.EMFILE, "Too many open files")
    assert errors.exhausted_resource(unrelated) is None
