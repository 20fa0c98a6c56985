"""A typed async client of lemonade-grpc: the RPCs, a failed call's details, a Watch that outlives restarts.

```python
async with connect("127.0.0.1:50051") as client:
    async for progress in client.load("tiny", pinned=True):
        print(progress.phase, progress.message)
    async for event in client.watch():  # reconnects and resumes by itself
        ...
```

A failed call raises `grpc.aio.AioRpcError`; `error_details(error)` reads
what the server put in it: the `ErrorInfo` reason (`MODEL_NOT_FOUND`,
`SLOTS_PINNED`, ...) and the request fields a `BadRequest` names.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as ipb
from lemonade_grpc._gen.lemonade.v1 import inference_pb2_grpc as inference_grpc
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2_grpc as control_grpc

DOMAIN = "lemonade.v1"
Reply = TypeVar("Reply")

_TOOL_MODES = {
    "auto": ipb.TOOL_CHOICE_MODE_AUTO,
    "none": ipb.TOOL_CHOICE_MODE_NONE,
    "required": ipb.TOOL_CHOICE_MODE_REQUIRED,
}

# How long a resuming Watch waits before reconnecting: doubling from the
# first figure up to the second, back to the first after a message arrives.
RECONNECT_SECONDS = (0.1, 2.0)


@dataclass(frozen=True, slots=True)
class ErrorDetails:
    """What a failed call says: its code and message, the ErrorInfo reason, the fields at fault.

    `reason` and `domain` are "" when the status carries no ErrorInfo (an
    error from gRPC itself, a deadline say).
    """

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    bad_fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        reason = f" {self.reason}" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"


def error_details(error: grpc.aio.AioRpcError) -> ErrorDetails:
    """The details of a failed call (from the `google.rpc.Status` in its trailers)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # typed for sync calls, works for aio
    info = error_details_pb2.ErrorInfo()
    fields: list[str] = []
    for detail in status.details if status is not None else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Unpack(bad_request):
            fields.extend(violation.field for violation in bad_request.field_violations)
    return ErrorDetails(
        code=error.code(),
        message=error.details() or "",
        reason=info.reason,
        domain=info.domain,
        metadata=dict(info.metadata),
        bad_fields=tuple(fields),
    )


@contextlib.asynccontextmanager
async def connect(
    address: str, *, token: str | None = None, credentials: grpc.ChannelCredentials | None = None
) -> AsyncIterator[Client]:
    """A client of `address` (HOST:PORT), its channel closed at the end of the block.

    Plaintext, or TLS with `credentials` (`grpc.ssl_channel_credentials(...)`:
    the CA that signed the server's certificate, and a client certificate
    for mutual TLS). With `token`, every call carries
    `authorization: Bearer <token>` (a server with `[auth]`).
    """
    kinds = (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)
    interceptors: list[grpc.aio.ClientInterceptor] = [kind(token) for kind in kinds] if token else []
    channel = (
        grpc.aio.secure_channel(address, credentials, interceptors=interceptors)
        if credentials is not None
        else grpc.aio.insecure_channel(address, interceptors=interceptors)
    )
    async with channel:
        yield Client(channel)


class _Bearer:
    """Adds the bearer token to the metadata of a call."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        return details._replace(metadata=grpc.aio.Metadata(*(details.metadata or ()), self._entry))


# grpc.aio files an interceptor under the first call kind it implements
# only: one class per kind.
class _BearerUnaryUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _BearerUnaryStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _BearerStreamUnary(_Bearer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)


class _BearerStreamStream(_Bearer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._with_token(details), requests)


class Client:
    """The two services of one channel, with typed methods. `control` and `inference` are the raw stubs."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.control = control_grpc.ModelControlStub(channel)
        self.inference = inference_grpc.InferenceStub(channel)

    def load(
        self,
        model: str,
        *,
        ctx_size: int | None = None,
        idle_unload_seconds: int | None = None,
        backend_args: Sequence[str] | None = None,
        pinned: bool | None = None,
    ) -> AsyncIterator[pb.LoadResponse]:
        """Load `model` (options left out keep the current ones); the progress, READY last."""
        request = pb.LoadRequest(model=model, options=_options(ctx_size, idle_unload_seconds, backend_args))
        if pinned is not None:
            request.pinned = pinned
        return _messages(self.control.Load(request))

    async def plan(
        self,
        model: str,
        *,
        ctx_size: int | None = None,
        idle_unload_seconds: int | None = None,
        backend_args: Sequence[str] | None = None,
        pinned: bool | None = None,
    ) -> pb.PlanResponse:
        """What `load` with the same arguments would do now, without doing it."""
        request = pb.PlanRequest(model=model, options=_options(ctx_size, idle_unload_seconds, backend_args))
        if pinned is not None:
            request.pinned = pinned
        return await self.control.Plan(request)

    async def unload(self, model: str = "") -> list[str]:
        """Unload `model` (every model when ""); the names stopped."""
        return list((await self.control.Unload(pb.UnloadRequest(model=model))).unloaded)

    async def pin(self, model: str, pinned: bool = True) -> pb.ModelStatus:
        """Pin (or unpin) a loaded model; its status once the pin is saved."""
        return (await self.control.Pin(pb.PinRequest(model=model, pinned=pinned))).status

    async def status(self) -> pb.PoolStatus:
        return (await self.control.Status(pb.StatusRequest())).pool

    async def models(self) -> list[pb.CatalogModel]:
        return list((await self.control.ListModels(pb.ListModelsRequest())).models)

    def complete(self, model: str, prompt: str, **sampling: object) -> AsyncIterator[ipb.CompleteResponse]:
        """Stream a completion; `sampling` takes the request's fields (max_tokens, temperature, seed, ...)."""
        request = ipb.CompleteRequest(model=model, prompt=prompt, **sampling)  # type: ignore[arg-type]
        return _messages(self.inference.Complete(request))

    def chat(
        self,
        model: str,
        messages: Sequence[tuple[str, str] | Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] = (),
        tool_choice: str | None = None,
        response_format: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **sampling: object,
    ) -> AsyncIterator[ipb.ChatResponse]:
        """Stream a chat reply to `messages`; `sampling` as for `complete`.

        A message is a (role, content) pair or a dict in OpenAI's shape
        (`{"role": "tool", "tool_call_id": ..., "content": ...}`, an
        assistant's `tool_calls` as `{"id", "name", "arguments"}`). `tools`
        are `{"name", "description", "parameters": <JSON Schema>}`;
        `tool_choice` is "auto", "none", "required" or a tool's name;
        `response_format` is the message as JSON (`{"json_schema": {"schema":
        {...}}}`, `{"json_object": {}}`, `{"grammar": "..."}`); `timeout`
        is the call's deadline in seconds.
        """
        request = ipb.ChatRequest(model=model, **sampling)  # type: ignore[arg-type]
        for message in messages:
            if isinstance(message, tuple):
                request.messages.add(role=message[0], content=message[1])
            else:
                json_format.ParseDict(dict(message), request.messages.add())
        for tool in tools:
            json_format.ParseDict(dict(tool), request.tools.add())
        if tool_choice in _TOOL_MODES:
            request.tool_choice.mode = _TOOL_MODES[tool_choice]
        elif tool_choice is not None:
            request.tool_choice.function = tool_choice
        if response_format is not None:
            json_format.ParseDict(dict(response_format), request.response_format)
        return _messages(self.inference.Chat(request, timeout=timeout))

    async def embed(
        self,
        model: str,
        inputs: Sequence[str],
        *,
        normalize: bool = True,
    ) -> list[list[float]]:
        """One vector per input, in order; unit length unless `normalize` is False."""
        normalization = (
            ipb.EMBEDDING_NORMALIZATION_EUCLIDEAN if normalize else ipb.EMBEDDING_NORMALIZATION_NONE
        )
        request = ipb.EmbedRequest(model=model, inputs=inputs, normalization=normalization)
        answer = await self.inference.Embed(request)
        return [list(embedding.values) for embedding in answer.embeddings]

    async def tokenize(self, model: str, text: str, *, add_special: bool = False) -> list[int]:
        """The model's token ids for `text`."""
        answer = await self.inference.Tokenize(
            ipb.TokenizeRequest(model=model, text=text, add_special=add_special)
        )
        return list(answer.ids)

    async def detokenize(self, model: str, ids: Sequence[int]) -> str:
        """The text of token `ids`."""
        return (await self.inference.Detokenize(ipb.DetokenizeRequest(model=model, ids=ids))).text

    async def watch(
        self, since: int | None = None, *, resume: bool = True
    ) -> AsyncIterator[pb.WatchResponse]:
        """Pool events, as `Watch` streams them, across disconnections and server restarts.

        Without `since`, a snapshot first; with it, the events after that
        sequence number. When the stream breaks (UNAVAILABLE: the server
        stopped, restarted, or the connection dropped) and `resume` is on,
        it reconnects with the last sequence seen: the server replays what
        was missed, or, when it cannot (another run of the server, or too
        far behind), sends a snapshot with `resync = true` first. No event
        is yielded twice. Any other error ends the iteration by raising.
        """
        last = since
        wait = RECONNECT_SECONDS[0]
        while True:
            request = pb.WatchRequest() if last is None else pb.WatchRequest(since_sequence=last)
            call = self.control.Watch(request)
            try:
                async for message in call:
                    wait = RECONNECT_SECONDS[0]
                    if (
                        message.WhichOneof("event") != "snapshot"
                        and last is not None
                        and message.sequence <= last
                    ):
                        continue  # seen before the reconnection
                    last = message.sequence
                    yield message
            except grpc.aio.AioRpcError as error:
                if not resume or error.code() is not grpc.StatusCode.UNAVAILABLE:
                    raise
            finally:
                call.cancel()
            if not resume:
                return
            await asyncio.sleep(wait)
            wait = min(wait * 2, RECONNECT_SECONDS[1])


async def _messages(call: grpc.aio.UnaryStreamCall[Any, Reply]) -> AsyncIterator[Reply]:
    """The messages of a server stream; the call is cancelled when the consumer stops early."""
    try:
        async for message in call:
            yield message
    finally:
        call.cancel()


def _options(
    ctx_size: int | None, idle_unload_seconds: int | None, backend_args: Sequence[str] | None
) -> pb.LoadOptions:
    """A request's options: those left out are absent (they keep the current values)."""
    options = pb.LoadOptions()
    if ctx_size is not None:
        options.ctx_size = ctx_size
    if idle_unload_seconds is not None:
        options.idle_unload_seconds = idle_unload_seconds
    if backend_args is not None:
        options.backend_args.args.extend(backend_args)
    return options
