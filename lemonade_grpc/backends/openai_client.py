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
import os
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson

from lemonade_grpc.backends.chunks import Chunk, error_message
from lemonade_grpc.backends.http import (
    CONNECT_SECONDS,
    BackendConnectionError,
    BackendHTTPError,
    BackendProtocolError,
    Exchange,
    MalformedResponse,
    request_bytes,
    writable,
)
from lemonade_grpc.backends.pacing import Pacer, PacingClock, hold
from lemonade_grpc.backends.sse import SSEDecoder

ERROR_BODY_BYTES = 64 << 10
# The largest JSON answer read whole (`request_json`): 1,024 embeddings of 4,096
# numbers written out in JSON take about 90 MB.
JSON_BODY_BYTES = 256 << 20


@contextlib.asynccontextmanager
async def _request_failure() -> AsyncIterator[None]:
    """Turns a `BackendProtocolError` raised within into the request's `MalformedResponse`."""
    try:
        yield
    except BackendProtocolError as error:
        raise MalformedResponse(error.what) from error


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
        self._open: set[Exchange] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @contextlib.asynccontextmanager
    async def _exchange(
        self, method: bytes, path: str, body: bytes = b"", headers: Mapping[str, str] | None = None
    ) -> AsyncIterator[Exchange]:
        """Connect, send the request, and yield the exchange; its connection is closed on leaving."""
        if self._closed:
            raise BackendConnectionError("client closed")
        loop = asyncio.get_running_loop()
        exchange = Exchange(loop)
        request = request_bytes(method, path, self._host_header, body, headers)
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
            if error == errno.EINPROGRESS and not writable(sock):
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
                raise BackendHTTPError(status, error_message(text))
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
                        await hold(exchange, until, clock)
                if events.done:
                    return
            # The body ended without the terminator.
            raise BackendConnectionError("the backend's stream ended before data: [DONE]")

    async def request_json(
        self,
        method: bytes,
        path: str,
        payload: Mapping[str, Any] | None = None,
        on_open: Callable[[Callable[[], None]], None] | None = None,
        headers: Mapping[str, str] | None = None,
        limit: int = JSON_BODY_BYTES,
    ) -> Any:
        """`method` `path` (with `payload` as its JSON body) and its decoded JSON answer (embeddings, tokens).

        `on_open` and `headers` as for `stream`. The answer is read whole, at
        most `limit` bytes of it. Raises `BackendHTTPError` on an error
        status, an answer over `limit` or one that is not JSON (a 502: the
        backend's fault), and `BackendConnectionError` when the connection
        breaks or the client is closed. Counts as activity, as a stream
        does: a backend embedding a batch may be too busy for /health.
        """
        body = b"" if payload is None else orjson.dumps(payload)
        async with _request_failure(), self._exchange(method, path, body, headers) as exchange:
            status = await exchange.head
            self.last_activity = time.monotonic()
            if on_open is not None:
                on_open(exchange.close)
            data = await exchange.read_all(limit + 1 if status == 200 else ERROR_BODY_BYTES)
            self.last_activity = time.monotonic()
        if status != 200:
            raise BackendHTTPError(status, error_message(data.decode("utf-8", "replace")))
        if len(data) > limit:
            raise BackendHTTPError(502, f"an answer of more than {limit:,} bytes")
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            raise BackendHTTPError(502, f"an answer that is not JSON: {data[:200]!r}") from None

    async def close(self) -> None:
        """Break the requests in flight; no request connects again. Idempotent."""
        self._closed = True
        for exchange in list(self._open):
            exchange.close()
