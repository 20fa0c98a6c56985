"""A streaming HTTP client for an OpenAI-compatible backend (llama-server's API).

Each request has a connection of its own: connect, send, read the response
as it arrives (parsed by httptools, llhttp's binding), close. Closing the
connection (what happens when the consumer stops iterating) is how
llama-server learns to stop decoding. Once the client is closed (with its
backend) it never connects again (issue 9, finding 13: the health checker
reopened a stopped backend's session).

Not aiohttp (issue 13): its client costs the serving process 10 MiB and
about twice the CPU per request, for pooling and features this exchange of
one request per connection does not use.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import select
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
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


class BackendConnectionError(ConnectionError):
    """The connection to a backend could not be made, broke, or carried something that is not HTTP.

    `os_error` is the OSError behind it, if any (`api.errors.exhausted_resource`
    looks there for a shortage of ours, such as "Too many open files").
    """

    def __init__(self, message: str, os_error: OSError | None = None) -> None:
        super().__init__(message)
        self.os_error = os_error


class BackendProtocolError(BackendConnectionError):
    """The backend's answer is not valid HTTP (httptools refused it: `what`).

    To a health check, a failed check like any broken connection; a
    request's stream reports it as `MalformedResponse` (issue 18 finding 14).
    """

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what


class MalformedResponse(BackendHTTPError):
    """A request's answer that is not valid HTTP: the backend failed that request; it did not crash.

    issue 18 finding 14: it was reported as a broken connection,
    BACKEND_CRASHED, while the model stayed READY and served the next
    request. Like `MalformedEvent` (an answer in HTTP but not in the API),
    a 502: the backend's fault, for this request.
    """

    def __init__(self, what: str) -> None:
        super().__init__(502, f"its answer is not valid HTTP ({what})")


@contextlib.asynccontextmanager
async def _request_failure() -> AsyncIterator[None]:
    """Turns a `BackendProtocolError` raised within into the request's `MalformedResponse`."""
    try:
        yield
    except BackendProtocolError as error:
        raise MalformedResponse(error.what) from error


# Body bytes read but not yet taken before the connection is no longer
# read: a slow consumer slows the backend through TCP flow control.
READ_BUFFER_BYTES = 1 << 16
CONNECT_SECONDS = 10.0


class _Exchange(asyncio.Protocol):
    """One HTTP/1.1 request and its response on a connection of its own (httptools parses).

    `head` resolves once the response's status line and headers are in;
    `read` then hands out the body as it arrives. The connection is not
    read while more than `READ_BUFFER_BYTES` wait unread, or while `hold`
    says so. `close` breaks it from outside; a reader then sees
    `BackendConnectionError`. `release` ends it for good once its request
    is over.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.head: asyncio.Future[int] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._body = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: BackendConnectionError | None = None
        self._held = False
        self._paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._parser is None:
            return  # released: nothing more is read
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(BackendProtocolError(f"the backend's response is not valid HTTP: {error}", str(error)))
            self.close()
            return
        if len(self._body) > READ_BUFFER_BYTES:
            self._update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None and self.head.done():
            # The end of the body as the peer sees it (a close-delimited body
            # ends this way); a stream that needed more says so itself.
            self._complete = True
        elif not self._complete:
            os_error = exc if isinstance(exc, OSError) else None
            self._fail(BackendConnectionError(f"the backend closed the connection: {exc or 'EOF'}", os_error))
        self._wake()

    # httptools callbacks
    def on_headers_complete(self) -> None:
        if not self.head.done() and self._parser is not None:
            self.head.set_result(self._parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self._body += body
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self._wake()

    # the reader's side
    async def read(self) -> bytes:
        """The body bytes received since the last read (waiting for some); b"" once it is complete."""
        while not self._body:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._body)
        self._body.clear()
        if self._paused:
            self._update_reading()
        return data

    async def read_all(self, limit: int) -> bytes:
        """The rest of the body, at most `limit` bytes of it."""
        parts = bytearray()
        while len(parts) < limit and (data := await self.read()):
            parts += data
        return bytes(parts[:limit])

    def hold(self, held: bool) -> None:
        """Stop (True) or restart reading the connection."""
        self._held = held
        self._update_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if not self._complete:
            self._fail(BackendConnectionError("the connection was closed"))
        self._wake()

    def release(self) -> None:
        """Drop what ties this exchange into reference cycles; call once its request is over. Idempotent.

        issue 18 finding 15: the parser's callbacks hold the exchange, and an
        error it raised holds, through its traceback, a frame holding the
        exchange: every request left a cycle that only the collector's
        oldest generation frees, which the server runs rarely
        (`server.GC_THRESHOLD`), so they piled up under churn. Call after
        `close` (no byte is read after it); a later `close` is harmless.
        """
        self._parser = None
        self._error = None
        if self.head.done() and not self.head.cancelled() and self.head.exception() is not None:
            # The failed head holds the error a reader raised: keep a done future that holds nothing.
            self.head = asyncio.get_running_loop().create_future()
            self.head.cancel()

    def _fail(self, error: BackendConnectionError) -> None:
        if self._error is None:
            self._error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved: nobody may be waiting for it, and that is no fault

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _update_reading(self) -> None:
        pause = self._held or len(self._body) > READ_BUFFER_BYTES
        if self.transport is None or self.transport.is_closing() or pause == self._paused:
            return
        self._paused = pause
        if pause:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()


class OpenAIClient:
    """HTTP client of one backend at `base_url` (http://HOST:PORT). Loop thread only.

    Every request has a connection of its own, closed when it ends
    (llama-server closes one after a streamed response anyway), so nothing
    is pooled and nothing runs between requests.

    `last_activity` is the `time.monotonic()` of the last bytes read from a
    generation stream (0.0: none yet): a backend busy streaming may be too
    busy to answer /health in time, and this tells a hang from a busy
    backend. /health answers do not count (a backend answering 503 for good
    is not busy).
    After `close` (idempotent), the requests in flight break and every new
    one raises BackendConnectionError("client closed") without connecting.

    `clock` paces the stream interval (`PacingClock`: monotonic time and
    asyncio's sleep); a test steps a fake one (issue 18 finding 12).
    """

    def __init__(self, base_url: str, clock: PacingClock | None = None) -> None:
        self.base_url = base_url
        self.clock = clock or PacingClock()
        address = urlsplit(base_url)
        self._host = address.hostname or "127.0.0.1"
        self._port = address.port or 80
        self._host_header = f"{address.hostname}:{self._port}".encode()
        self.last_activity = 0.0
        self._open: set[_Exchange] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @contextlib.asynccontextmanager
    async def _exchange(
        self, method: bytes, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[_Exchange]:
        """Connect, send the request, and yield the exchange; its connection is closed on leaving."""
        if self._closed:
            raise BackendConnectionError("client closed")
        loop = asyncio.get_running_loop()
        exchange = _Exchange(loop)
        request = _request(method, path, self._host_header, body, headers)
        try:
            try:
                async with asyncio.timeout(CONNECT_SECONDS):
                    sock, sent = await self._connect_and_send(loop, request)
                    try:
                        await loop.create_connection(lambda: exchange, sock=sock)
                    except BaseException:
                        sock.close()
                        raise
            except OSError as error:
                raise BackendConnectionError(f"cannot connect to {self.base_url}: {error}", error) from error
            except TimeoutError as error:
                exchange.close()
                raise BackendConnectionError(f"cannot connect to {self.base_url}: timed out") from error
            self._open.add(exchange)
            try:
                if self._closed:  # closed while this one connected
                    raise BackendConnectionError("client closed")
                assert exchange.transport is not None
                if sent < len(request):
                    exchange.transport.write(request[sent:])
                yield exchange
            finally:
                self._open.discard(exchange)
                exchange.close()
        finally:
            exchange.release()  # issue 18 finding 15: no cycle outlives the request

    async def _connect_and_send(
        self, loop: asyncio.AbstractEventLoop, request: bytes
    ) -> tuple[socket.socket, int]:
        """A socket connected to the backend, and how much of `request` went out on it already.

        On loopback the handshake is done by the time connect() returns, so
        the request is written at once and reaches the backend while asyncio
        is still making the transport (a loop iteration or two, about 0.3 ms
        of time to first token under load); otherwise it waits for the
        connection as asyncio does, and the transport sends the request.
        """
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            address = (self._host, self._port)
            error = sock.connect_ex(address)
            if error == errno.EINPROGRESS and not _writable(sock):
                await loop.sock_connect(sock, address)
                return sock, 0
            error = error or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error not in (0, errno.EINPROGRESS):
                raise OSError(error, os.strerror(error))
            try:
                return sock, sock.send(request)
            except BlockingIOError:
                return sock, 0
        except BaseException:
            sock.close()
            raise

    async def health(self, limit_seconds: float = 5.0) -> int:
        """GET /health; return the HTTP status (llama-server: 503 while loading).

        Raises BackendConnectionError when it cannot connect or the client is
        closed, TimeoutError after `limit_seconds`.
        """
        async with asyncio.timeout(limit_seconds), self._exchange(b"GET", "/health") as exchange:
            return await exchange.head

    async def stream(
        self,
        path: str,
        payload: Mapping[str, Any],
        on_open: Callable[[Callable[[], None]], None] | None = None,
        headers: Mapping[str, str] | None = None,
        interval: float = 0.0,
    ) -> AsyncGenerator[list[Chunk], None]:
        """POST `payload` to `path` with streaming on; yield the events as they arrive.

        Each batch holds every event that had arrived when it was read: one
        while the consumer keeps up, more when it fell behind (the caller
        sends a batch as one message, which is how a fast backend never
        outruns a slower consumer). While the consumer is busy, at most
        `READ_BUFFER_BYTES` are buffered and then the socket is not read, so
        a slow consumer slows the backend through TCP flow control instead
        of growing a buffer here.

        `on_open(close)`, called once the response is open, hands out what
        breaks the stream from outside (the pool's revocation of a lease).
        `headers` go with the request (a trace context).

        `interval` (seconds): once text arrives faster than one batch per
        `interval`, the next batch is read no sooner than `interval` after
        the last one was taken, and the connection is not read meanwhile
        (its transport paused from that read on): the kernel gathers the
        backend's per-token writes and one read takes them all. Time is
        `self.clock`'s. Never held: the first text, the
        read after the `max_tokens`-th delta or after an event that ends the
        stream, and any stream whose deltas come slower than `interval`.

        Raises `BackendHTTPError` on an error status or error event, or an
        answer that is not valid HTTP (`MalformedResponse`), and
        `BackendConnectionError` when the connection breaks or the stream
        ends without `data: [DONE]` or the client is closed. Stopping the
        iteration early closes the connection, which tells llama-server to
        stop generating.
        """
        body = orjson.dumps({**payload, "stream": True, "stream_options": {"include_usage": True}})
        async with _request_failure(), self._exchange(b"POST", path, body, headers) as exchange:
            status = await exchange.head
            self.last_activity = time.monotonic()
            if status != 200:
                text = (await exchange.read_all(ERROR_BODY_BYTES)).decode("utf-8", "replace")
                raise BackendHTTPError(status, _error_message(text))
            if on_open is not None:
                on_open(exchange.close)  # who may break the stream from outside
            events = SSEDecoder()
            pacer = Pacer(interval, payload.get("max_tokens")) if interval > 0 else None
            clock = self.clock
            while data := await exchange.read():
                self.last_activity = time.monotonic()  # one float store per read: cheap
                batch = events.feed(data)
                if batch:
                    until = pacer.hold_until(batch, clock.now()) if pacer is not None else 0.0
                    if until:
                        # Unread from this read on, not from when the consumer
                        # comes back: what arrived while it sent the batch would
                        # otherwise come alone right after the hold, a second
                        # message in one interval ([1, 1, 1, 17]; issue 18 finding 12).
                        exchange.hold(True)
                    yield batch
                    if until:
                        await _hold(exchange, until, clock)
                if events.done:
                    return
            # The body ended without the terminator.
            raise BackendConnectionError("the backend's stream ended before data: [DONE]")

    async def close(self) -> None:
        """Break the requests in flight; no request connects again. Idempotent."""
        self._closed = True
        for exchange in list(self._open):
            exchange.close()


def _writable(sock: socket.socket) -> bool:
    """Whether `sock` can be written now (its connection is made), without waiting."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


def _request(method: bytes, path: str, host: bytes, body: bytes, headers: Mapping[str, str] | None) -> bytes:
    """The bytes of an HTTP/1.1 request that asks the server to close the connection after it."""
    lines = [method + b" " + path.encode() + b" HTTP/1.1", b"Host: " + host, b"Connection: close"]
    if body:
        lines += [b"Content-Type: application/json", b"Content-Length: " + str(len(body)).encode()]
    for name, value in (headers or {}).items():
        if not _HEADER_SAFE.fullmatch(name) or not _HEADER_SAFE.fullmatch(value):
            continue  # never a header a value could split (trace context: always plain)
        lines.append(f"{name}: {value}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


_HEADER_SAFE = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")
ERROR_BODY_BYTES = 64 << 10


class Pacer:
    """When a stream's next read may happen: at most one batch per `interval` once deltas come faster.

    `max_tokens`: the request's limit, after which only the end of the
    stream is left to read (never waited for).
    """

    __slots__ = ("_interval", "_last", "_left")

    def __init__(self, interval: float, max_tokens: object) -> None:
        self._interval = interval
        self._left = max_tokens if type(max_tokens) is int else -1  # -1: no limit
        self._last = -interval  # when the previous batch with text was taken

    def hold_until(self, batch: list[Chunk], now: float) -> float:
        """The time (`now`'s clock) before which the read after `batch` should wait; 0.0: read at once."""
        texts = sum(1 for chunk in batch if chunk.text)
        if not texts:
            return 0.0
        previous, self._last = self._last, now
        if self._left >= 0:
            self._left = max(0, self._left - texts)
        fast = texts > 1 or now - previous < self._interval
        if not fast or self._left == 0 or any(chunk.is_last for chunk in batch):
            return 0.0
        return now + self._interval


class PacingClock:
    """The time the stream interval is measured in: `now` (time.monotonic) and `sleep` (asyncio's).

    A dependency of `OpenAIClient` so that a test can step time instead of
    waiting for it (issue 18 finding 12: a pacing test failed 2 runs in 5).
    """

    now = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _hold(exchange: _Exchange, until: float, clock: PacingClock) -> None:
    """Keep the held connection unread until `until` (`clock.now()`); read it again even if cancelled."""
    try:
        delay = until - clock.now()
        if delay > 0:
            await clock.sleep(delay)
    finally:
        exchange.hold(False)


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
