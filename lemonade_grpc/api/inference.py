"""The Inference servicer: streams a backend's completion as gRPC messages.

Each request holds a lease on its model for its whole life (`Pool.lease`),
which also loads the model if needed. Leaving the `async for` early (client
cancelled, deadline passed) closes the HTTP stream, and llama-server stops
decoding for that slot.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Literal, TypeVar, cast

import grpc

from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as pb
from lemonade_grpc._gen.lemonade.v1 import inference_pb2_grpc as pb_grpc
from lemonade_grpc.api import errors, formats, tools, vectors
from lemonade_grpc.backends.chunks import Alternative, Chunk, TokenLogprob
from lemonade_grpc.backends.http import BackendConnectionError, BackendHTTPError
from lemonade_grpc.core import bounds
from lemonade_grpc.core.catalog import ModelSpec
from lemonade_grpc.core.errors import (
    BackendCrashed,
    BackendError,
    BackendRejected,
    InvalidRequest,
    LemonadeError,
)
from lemonade_grpc.pool.model import Lease
from lemonade_grpc.pool.pool import Pool
from lemonade_grpc.telemetry.streams import StreamTelemetry

Context = grpc.aio.ServicerContext
FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
}
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
# How many times a request is tried on a backend found dead (`DeadBackend`): the
# first try, and one on a fresh lease, which loads the model anew.
TRIES = 2
T = TypeVar("T")


class DeadBackend(BackendCrashed):
    """A READY model's backend refused the connection: it had died, and the pool had not seen it yet.

    Nothing reached the backend, so the request is tried once more
    (`TRIES`) on a fresh lease: the pool, told at once (`Pool.refused`),
    loads the model anew for it. Reported as the crash it is when the
    fresh backend refuses too.
    """


# The names of the optional sampling floats (`bounds.SAMPLING_FLOATS`).
FloatField = Literal[
    "temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"
]


def sampling_payload(request: pb.CompleteRequest | pb.ChatRequest) -> dict[str, Any]:
    """The OpenAI-compatible sampling fields of `request`; raises `InvalidRequest` naming a bad one."""
    vectors.require_model(request)
    payload: dict[str, Any] = {}
    if request.HasField("max_tokens"):
        if request.max_tokens not in bounds.MAX_TOKENS:
            raise InvalidRequest(
                f"max_tokens must be in {bounds.MAX_TOKENS}, got {request.max_tokens}", field="max_tokens"
            )
        payload["max_tokens"] = request.max_tokens
    for field, low, high, low_inclusive in bounds.SAMPLING_FLOATS:
        name = cast(FloatField, field)
        if request.HasField(name):
            value = getattr(request, name)
            above_low = value >= low if low_inclusive else value > low
            if not (math.isfinite(value) and above_low and value <= high):
                bracket = "[" if low_inclusive else "("
                raise InvalidRequest(
                    f"{name} must be in {bracket}{low:g}, {high:g}], got {value}", field=name
                )
            payload[name] = value
    if request.HasField("top_k"):
        if request.top_k not in bounds.TOP_K:
            raise InvalidRequest(f"top_k must be in {bounds.TOP_K}, got {request.top_k}", field="top_k")
        payload["top_k"] = request.top_k
    if request.HasField("seed"):
        payload["seed"] = request.seed
    if len(request.stop) > bounds.STOP_STRINGS or any(
        not s or len(s.encode()) > bounds.STOP_STRING_BYTES for s in request.stop
    ):
        raise InvalidRequest(
            f"stop takes at most {bounds.STOP_STRINGS} non-empty strings of at most"
            f" {bounds.STOP_STRING_BYTES} bytes each",
            field="stop",
        )
    if request.stop:
        payload["stop"] = list(request.stop)
    if request.ignore_eos:
        payload["ignore_eos"] = True
    if request.HasField("logprobs"):
        if request.logprobs not in bounds.TOP_LOGPROBS:
            raise InvalidRequest(
                f"logprobs must be in {bounds.TOP_LOGPROBS}, got {request.logprobs}", field="logprobs"
            )
        if isinstance(request, pb.ChatRequest):
            payload |= {"logprobs": True, "top_logprobs": request.logprobs}
        else:
            payload["logprobs"] = request.logprobs
    return payload


def prompt_payload(request: pb.CompleteRequest) -> dict[str, Any]:
    """The prompt of a Complete request; raises `InvalidRequest` when it is empty."""
    if not request.prompt:
        raise InvalidRequest("prompt is required", field="prompt")
    return {"prompt": request.prompt}


def chat_payload(request: pb.ChatRequest) -> dict[str, Any]:
    """The OpenAI-style messages (and tools) of a Chat request; raises `InvalidRequest` naming a bad one."""
    if not request.messages:
        raise InvalidRequest("messages must hold at least one message", field="messages")
    messages = []
    for index, message in enumerate(request.messages):
        if message.role not in CHAT_ROLES:
            roles = ", ".join(sorted(CHAT_ROLES))
            raise InvalidRequest(
                f"messages[{index}].role must be one of {roles}, got {message.role!r}",
                field=f"messages[{index}].role",
            )
        messages.append(tools.message_payload(message, index))
    return {"messages": messages} | tools.tools_payload(request)


Request = TypeVar("Request", pb.CompleteRequest, pb.ChatRequest)
Reply = TypeVar("Reply", pb.CompleteResponse, pb.ChatResponse)


class Inference(pb_grpc.InferenceServicer):
    """Complete and Chat: one backend stream each, relayed with coalescing."""

    def __init__(self, pool: Pool, telemetry: StreamTelemetry | None = None) -> None:
        self._pool = pool
        self._telemetry = telemetry or StreamTelemetry()
        self._interval = pool.limits.stream_interval_ms / 1000

    @errors.stream
    async def Complete(
        self, request: pb.CompleteRequest, context: Context[pb.CompleteRequest, pb.CompleteResponse]
    ) -> AsyncGenerator[pb.CompleteResponse, None]:
        relay = self._relay(request, prompt_payload, "/v1/completions", pb.CompleteResponse)
        async with contextlib.aclosing(relay) as replies:
            async for reply in replies:
                yield reply

    @errors.stream
    async def Chat(
        self, request: pb.ChatRequest, context: Context[pb.ChatRequest, pb.ChatResponse]
    ) -> AsyncGenerator[pb.ChatResponse, None]:
        relay = self._relay(
            request, chat_payload, "/v1/chat/completions", pb.ChatResponse, tools.check_capability
        )
        async with contextlib.aclosing(relay) as replies:
            async for reply in replies:
                yield reply

    @errors.unary
    async def Embed(
        self, request: pb.EmbedRequest, context: Context[pb.EmbedRequest, pb.EmbedResponse]
    ) -> pb.EmbedResponse:
        payload = vectors.embed_payload(request)
        vectors.check_embedding_model(self._pool.spec(request.model))

        async def embed(lease: Lease) -> Any:
            try:
                return await self._on(lease, request.model, b"POST", "/v1/embeddings", payload, raw=True)
            except BackendHTTPError as error:
                tokens = vectors.too_large(error.message)
                if tokens is None:
                    raise _http_error(error) from error
                raise InvalidRequest(
                    f"an input of {tokens} tokens is longer than the context of {request.model}"
                    f" ({error.message})",
                    field=await self._longest_input(lease, request),
                ) from error

        answer = await self._leased(request.model, embed)
        return vectors.embed_response(answer, len(request.inputs))

    @errors.unary
    async def Rerank(
        self, request: pb.RerankRequest, context: Context[pb.RerankRequest, pb.RerankResponse]
    ) -> pb.RerankResponse:
        payload = vectors.rerank_payload(request)
        vectors.check_reranker(self._pool.spec(request.model))
        answer = await self._leased(
            request.model, lambda lease: self._on(lease, request.model, b"POST", "/v1/rerank", payload)
        )
        top_n = request.top_n if request.HasField("top_n") else None
        return vectors.rerank_response(answer, len(request.documents), top_n)

    @errors.unary
    async def Tokenize(
        self, request: pb.TokenizeRequest, context: Context[pb.TokenizeRequest, pb.TokenizeResponse]
    ) -> pb.TokenizeResponse:
        payload = vectors.tokenize_payload(request)
        answer = await self._leased(
            request.model, lambda lease: self._on(lease, request.model, b"POST", "/tokenize", payload)
        )
        return vectors.tokenize_response(answer, request.with_pieces)

    @errors.unary
    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: Context[pb.DetokenizeRequest, pb.DetokenizeResponse]
    ) -> pb.DetokenizeResponse:
        vectors.detokenize_payload(request, None)  # the request's own faults first, before any load

        async def detokenize(lease: Lease) -> Any:
            if lease.backend.vocabulary is None:
                answer = await self._on(lease, request.model, b"GET", "/v1/models", None)
                lease.backend.vocabulary = vectors.vocabulary_size(answer)
            payload = vectors.detokenize_payload(request, lease.backend.vocabulary)
            return await self._on(lease, request.model, b"POST", "/detokenize", payload)

        return vectors.detokenize_response(await self._leased(request.model, detokenize))

    async def _leased(self, model: str, work: Callable[[Lease], Awaitable[T]]) -> T:
        """`work` under a lease on `model`; once more on a fresh lease if the backend was dead."""
        for tries_left in reversed(range(TRIES)):
            try:
                async with self._pool.lease(model) as lease:
                    return await work(lease)
            except DeadBackend:
                if not tries_left:
                    raise
        raise AssertionError("unreachable: the last try returns or raises")

    async def _longest_input(self, lease: Lease, request: pb.EmbedRequest) -> str:
        """The field naming the input with the most tokens: which of a batch was too long."""
        counts = []
        for text in request.inputs:
            answer = await self._on(lease, request.model, b"POST", "/tokenize", {"content": text})
            counts.append(len(vectors.tokenize_response(answer, False).ids))
        return f"inputs[{counts.index(max(counts))}]"

    def _broken_stream(self, error: BackendConnectionError, model: str, lease: Lease) -> LemonadeError:
        """Why a backend stream broke: the pool's reason (eviction, crash), our shortage, or a crash."""
        if lease.revoked is not None:
            return lease.revoked
        # Out of file descriptors or memory on our side, the backend is fine:
        # not a crash (issue 9, finding 7, "Too many open files").
        shortage = errors.exhausted_resource(error)
        if shortage is not None:
            return errors.server_resources_exhausted(shortage)
        if isinstance(error.os_error, ConnectionRefusedError):
            self._pool.refused(model, lease)
            return DeadBackend(f"the backend of {model} refused the connection: {error}")
        return BackendCrashed(f"lost the connection to the backend of {model}: {error}")

    async def _on(
        self,
        lease: Lease,
        model: str,
        method: bytes,
        path: str,
        payload: dict[str, Any] | None,
        *,
        raw: bool = False,
    ) -> Any:
        """One JSON request on a leased backend, its errors answered as a stream's are.

        With `raw`, a backend's HTTP error is raised as it is, for the caller to read.
        """
        with self._telemetry.backend_call(model, path, lease.backend) as headers:
            try:
                return await lease.backend.client.request_json(
                    method, path, payload, on_open=lease.on_revoke, headers=headers
                )
            except BackendHTTPError as error:
                if raw:
                    raise
                raise _http_error(error) from error
            except BackendConnectionError as error:
                raise self._broken_stream(error, model, lease) from error

    async def _batches(
        self, lease: Lease, model: str, path: str, payload: dict[str, Any]
    ) -> AsyncGenerator[list[Chunk], None]:
        """The backend's stream for one request, in batches of chunks; its errors as the pool's."""
        with self._telemetry.backend_call(model, path, lease.backend) as headers:
            batches = lease.backend.client.stream(
                path, payload, on_open=lease.on_revoke, headers=headers, interval=self._interval
            )
            try:
                async for batch in batches:
                    yield batch
            except BackendHTTPError as error:
                raise _http_error(error) from error
            except BackendConnectionError as error:
                raise self._broken_stream(error, model, lease) from error
            finally:
                # Now, not at garbage collection: a client gone closes the
                # backend's stream at once (llama-server stops decoding).
                await batches.aclose()

    async def _relay(
        self,
        request: Request,
        content: Callable[[Request], dict[str, Any]],
        path: str,
        reply: type[Reply],
        check: Callable[[Request, ModelSpec], None] | None = None,
    ) -> AsyncGenerator[Reply, None]:
        """Stream `request` to its model's backend under a lease; one message per batch of deltas.

        The deltas that arrived while the previous message was being sent go
        out together as one message (`token_count` says how many): the proxy
        keeps up with any backend, and a slow one still streams token by token.
        The last message carries finish_reason, usage and timings.
        """
        started = time.perf_counter()
        model = request.model
        first_token_ms = 0.0
        tokens = 0
        outcome = "cancelled"  # unless it ends otherwise: the client left (or its deadline passed)
        final = reply()
        try:
            payload = sampling_payload(request) | content(request) | formats.format_payload(request)
            if check is not None:  # what the model can serve, once the request itself is valid
                check(request, self._pool.spec(model))
            for tries_left in reversed(range(TRIES)):  # a dead backend: once more (`DeadBackend`)
                try:
                    async with (
                        self._pool.lease(model) as lease,
                        contextlib.aclosing(self._batches(lease, model, path, payload)) as batches,
                    ):
                        async for batch in batches:
                            deltas = [chunk for chunk in batch if chunk.has_delta]
                            for chunk in batch:
                                if chunk.is_last:
                                    _fill_final(final, chunk)
                            if deltas:
                                if not first_token_ms:
                                    first_token_ms = (time.perf_counter() - started) * 1000
                                tokens += len(deltas)
                                yield _delta(reply, deltas)
                    break
                except DeadBackend:
                    if not tries_left:
                        raise
            outcome = "ok"
        except LemonadeError as error:
            outcome = error.reason
            raise
        except Exception:
            outcome = "INTERNAL_ERROR"
            raise
        finally:
            # Only catalog names become label values: a client's made-up names would grow
            # the metrics without end (and push real models' series into the overflow).
            label = model if model in self._pool.catalog else ""
            self._telemetry.stream_ended(label, tokens, first_token_ms / 1000, outcome)
        final.timings.time_to_first_token_ms = first_token_ms
        yield final


def _delta(reply: type[Reply], deltas: list[Chunk]) -> Reply:
    """One message of the deltas of a batch: their text joined (and, for Chat, reasoning and tool calls)."""
    message = reply(text="".join(chunk.text for chunk in deltas), token_count=len(deltas))
    tokens = [token for chunk in deltas if chunk.logprobs for token in chunk.logprobs]
    if tokens:
        message.logprobs.extend(_token_logprob(token) for token in tokens)
    if isinstance(message, pb.ChatResponse):
        message.reasoning = "".join(chunk.reasoning for chunk in deltas)
        pieces = [piece for chunk in deltas for piece in chunk.tool_calls or ()]
        if pieces:
            message.tool_calls.extend(tools.join_pieces(pieces))
    return message


def _alternative(alternative: Alternative) -> pb.TokenAlternative:
    return pb.TokenAlternative(
        id=alternative.id, text=alternative.text, bytes=alternative.data, logprob=alternative.logprob
    )


def _token_logprob(token: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(token=_alternative(token.token), top=[_alternative(a) for a in token.top])


def _http_error(error: BackendHTTPError) -> LemonadeError:
    """The error a backend's HTTP error status becomes: its fault (5xx) or the request's (4xx)."""
    if 400 <= error.status < 500:
        return BackendRejected(f"the backend refused the request: {error.message}")
    return BackendError(f"the backend failed the request: {error.message}")


def _fill_final(final: pb.CompleteResponse | pb.ChatResponse, chunk: Chunk) -> None:
    """Copy what the last events of a stream carry (finish reason, usage, timings) onto `final`."""
    if chunk.finish_reason is not None:
        final.finish_reason = FINISH_REASONS.get(chunk.finish_reason, pb.FINISH_REASON_STOP)
    if chunk.completion_tokens is not None:
        final.usage.prompt_tokens = chunk.prompt_tokens or 0
        final.usage.completion_tokens = chunk.completion_tokens
    if chunk.tokens_per_second is not None:
        final.timings.tokens_per_second = chunk.tokens_per_second
        final.timings.prompt_ms = chunk.prompt_ms or 0.0
