"""A streaming HTTP client for an OpenAI-compatible backend (llama-server's API).

One `aiohttp` session per backend, created on first use and closed with the
backend; once closed, the client never opens another (issue 9, finding 13:
the health checker recreated a stopped backend's session, leaking one
"Unclosed client session" per check). Streams are read line by line from the SSE body;
closing the response (what happens when the consumer stops iterating) closes
the connection, which is how llama-server learns to stop decoding.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson


class BackendHTTPError(Exception):
    """The backend answered a request with an error status or an error event."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"backend answered {status}: {message}")
        self.status = status
        self.message = message


@dataclass(slots=True)
class Chunk:
    """One parsed SSE event of a completion stream.

    `text` is the delta (possibly empty); the other fields are set on the
    event that carries them (llama-server sends `finish_reason` and `timings`
    on the last content event and `usage` on a separate, final one).
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_ms: float | None = None
    tokens_per_second: float | None = None

    @property
    def is_last(self) -> bool:
        """Whether it carries what only the end of a stream does (finish reason, usage, timings)."""
        return (
            self.finish_reason is not None
            or self.completion_tokens is not None
            or self.tokens_per_second is not None
        )


# The longest SSE line we buffer: an event carries one delta (a token, a few
# bytes); a backend that never ends its line must not grow us without end.
MAX_LINE_BYTES = 16 << 20
# Token counts go out as uint32.
_COUNT_MAX = (1 << 32) - 1


class MalformedEvent(BackendHTTPError):
    """An event no OpenAI-compatible server sends (wrong JSON type, field or range): a backend fault."""

    def __init__(self, what: str) -> None:
        super().__init__(502, f"malformed stream event: {what}")


def parse_chunk(event: object) -> Chunk:
    """Turn one decoded SSE event of /v1/completions or /v1/chat/completions into a `Chunk`.

    Raises `BackendHTTPError` for an error event and `MalformedEvent` for an
    event whose shape or fields are not what the API defines (a backend's
    fault, never a bug of ours).
    """
    if not isinstance(event, dict):
        raise MalformedEvent(f"expected an object, got {type(event).__name__}")
    if "error" in event:
        error = event["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        code = error.get("code") if isinstance(error, dict) else None
        status = code if type(code) is int and 400 <= code <= 599 else 500
        raise BackendHTTPError(status, str(message)[:1000])
    chunk = Chunk("")
    choices = event.get("choices")
    if choices:
        if not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise MalformedEvent("choices must be a list of objects")
        choice = choices[0]
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        finish_reason = choice.get("finish_reason")
        if not isinstance(text, str | None) or not isinstance(finish_reason, str | None):
            raise MalformedEvent("text and finish_reason must be strings")
        chunk.text = text or ""
        chunk.finish_reason = finish_reason
    usage = event.get("usage")
    if isinstance(usage, dict):
        chunk.prompt_tokens = _field(usage, "prompt_tokens", int, _COUNT_MAX)
        chunk.completion_tokens = _field(usage, "completion_tokens", int, _COUNT_MAX)
    timings = event.get("timings")
    if isinstance(timings, dict):
        chunk.prompt_ms = _field(timings, "prompt_ms", float, 1e12)
        chunk.tokens_per_second = _field(timings, "predicted_per_second", float, 1e12)
    return chunk


def _field(table: dict[str, Any], name: str, kind: type[int] | type[float], high: float) -> Any:
    """`table[name]` when absent (None) or a number of `kind` in 0..`high`; else `MalformedEvent`."""
    value = table.get(name)
    if value is None:
        return None
    accepted = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, accepted) or not 0 <= value <= high:
        raise MalformedEvent(f"{name} must be a number in 0..{high:g}, got {str(value)[:50]}")
    return kind(value)


class SSEDecoder:
    """Incremental decoder of an OpenAI-style SSE body: `data: {json}` lines, `data: [DONE]` at the end.

    `feed` takes bytes as they arrive, in pieces of any size, and returns the
    chunks of the events completed by them. Lines other than `data:` and
    `error:` (comments, blank lines between events) are skipped.
    """

    __slots__ = ("_pending", "done")

    def __init__(self) -> None:
        self._pending = b""
        self.done = False

    def feed(self, data: bytes) -> list[Chunk]:
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        if len(self._pending) > MAX_LINE_BYTES:
            raise MalformedEvent(f"a line of more than {MAX_LINE_BYTES:,} bytes")
        chunks: list[Chunk] = []
        for line in lines:
            if line.startswith(b"data: "):
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    self.done = True
                    break
                try:
                    event = orjson.loads(payload)  # a few times faster than json: it runs per token
                except orjson.JSONDecodeError:
                    raise BackendHTTPError(502, f"malformed stream event: {payload[:200]!r}") from None
                chunks.append(parse_chunk(event))
            elif line.startswith(b"error: "):
                raise BackendHTTPError(500, _error_message(line[7:].decode("utf-8", "replace")))
        return chunks


class OpenAIClient:
    """HTTP client of one backend at `base_url`. Loop thread only.

    `last_activity` is the `time.monotonic()` of the last bytes read from a
    generation stream (0.0: none yet): a backend busy streaming may be too
    busy to answer /health in time, and this tells a hang from a busy
    backend. /health answers do not count (a backend answering 503 for good
    is not busy).
    After `close` (idempotent), every request raises
    aiohttp.ClientConnectionError("client closed").
    """

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.last_activity = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise aiohttp.ClientConnectionError("client closed")
        # Created lazily so that it binds to the running loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                self.base_url,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                # llama-server closes the connection after a streamed response
                # (whatever its Keep-Alive header says): reusing one fails.
                connector=aiohttp.TCPConnector(limit=0, force_close=True),
            )
        return self._session

    async def health(self, limit_seconds: float = 5.0) -> int:
        """GET /health; return the HTTP status (llama-server: 503 while loading).

        Raises aiohttp.ClientError when it cannot connect or the client is
        closed, TimeoutError after `limit_seconds`.
        """
        limit = aiohttp.ClientTimeout(total=limit_seconds)
        async with self._get_session().get("/health", timeout=limit) as response:
            return response.status

    async def stream(
        self,
        path: str,
        payload: Mapping[str, Any],
        on_open: Callable[[Callable[[], None]], None] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncGenerator[list[Chunk], None]:
        """POST `payload` to `path` with streaming on; yield the events as they arrive.

        Each batch holds every event that had arrived when it was read: one
        while the consumer keeps up, more when it fell behind (the caller
        sends a batch as one message, which is how a fast backend never
        outruns a slower consumer). While the consumer is busy, aiohttp
        buffers at most its read limit and then stops reading the socket, so a
        slow consumer slows the backend through TCP flow control instead of
        growing a buffer here.

        `on_open(close)`, called once the response is open, hands out what
        breaks the stream from outside (the pool's revocation of a lease).
        `headers` go with the request (a trace context).

        Raises `BackendHTTPError` on an error status or error event, and
        aiohttp.ClientError when the connection breaks or the stream ends
        without `data: [DONE]` or the client is closed. Stopping the
        iteration early closes the connection, which tells llama-server to
        stop generating.
        """
        body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        async with self._get_session().post(path, json=body, headers=headers) as response:
            self.last_activity = time.monotonic()
            if response.status != 200:
                text = (await response.read()).decode("utf-8", "replace")  # need not be UTF-8
                raise BackendHTTPError(response.status, _error_message(text))
            if on_open is not None:
                on_open(response.close)  # who may break the stream from outside
            events = SSEDecoder()
            try:
                while data := await response.content.readany():
                    self.last_activity = time.monotonic()  # one float store per read: cheap
                    batch = events.feed(data)
                    if batch:
                        yield batch
                    if events.done:
                        return
            except RuntimeError as error:
                # aiohttp's StreamReader raises a bare RuntimeError("Connection
                # closed.") when the session is closed under a reader (the
                # backend crashed and was cleaned up): a broken connection.
                raise aiohttp.ClientConnectionError(str(error)) from error
            # The body ended without the terminator: the backend went away
            # mid-stream (a close-delimited body ends "cleanly" even then).
            raise aiohttp.ClientPayloadError("the backend's stream ended before data: [DONE]")

    async def close(self) -> None:
        """Close the session (breaking the requests in flight); no request opens another. Idempotent."""
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def _error_message(body: str) -> str:
    """The `error.message` of an OpenAI-style error body, else the body itself."""
    try:
        decoded = json.loads(body)
    except ValueError:
        return body.strip()[:2000]
    error = decoded.get("error") if isinstance(decoded, dict) else None
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return body.strip()[:2000]
