"""`GET /metrics`: a small HTTP/1.1 server on the event loop, collections in a thread of their own.

Not aiohttp (issue 18, finding 4): its server cost the serving process
about 10 MiB of resident memory for one route; this one parses with
httptools (already here for the backend client) and is a few hundred lines.
Not prometheus_client's own server either: a thread per connection, kept as
long as the client keeps it, and a traceback on stderr (past the log format)
for each connection reset.

A collection (the gauges' snapshots, the process metrics, the text
encoding) runs in `Collections`' own thread, never in asyncio's default
executor: that pool writes pins and backend records, reads GGUF headers and
/proc for loads, and 200 scraping connections queued ahead of it made a Pin
take 555 ms instead of 1.5 (finding 4). Collections are single-flight: a
scrape that arrives while one runs waits for the next, which every scrape
that arrived meanwhile shares; a burst of N scrapes costs two collections,
and each answer was collected after its request arrived. And they start at
least `MIN_COLLECTION_INTERVAL` apart, so that a flood cannot keep the
collection thread busy all the time (see there).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httptools

from lemonade_grpc.telemetry.service import PrometheusListenError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

# An idle connection is closed after this long (Prometheus scrapes every 15-60 s and reconnects).
KEEPALIVE_SECONDS = 75.0
# A request's line and headers (and any body): Prometheus sends a few hundred bytes.
MAX_REQUEST_BYTES = 16 << 10
# Requests read ahead on one connection (pipelining) before reading pauses.
MAX_PIPELINED = 8
# How long a refused request's connection is drained before it is closed (`_Connection._fail`).
LINGER_SECONDS = 2.0
# Connections held at once: past it, the one idle longest is closed. Each is a
# descriptor of the process that also needs them for gRPC streams and backends.
MAX_CONNECTIONS = 256
LISTEN_BACKLOG = 128
# Collections start at least this far apart. A flood of scrapes otherwise keeps the collection
# thread always runnable, and every hand-over of the GIL to the event loop waits for its switch
# interval (5 ms): a Pin, which changes threads three times, took 6x longer under 200 connections
# scraping back to back. Prometheus scrapes every 15-60 s; a scrape waits at most this long more.
MIN_COLLECTION_INTERVAL = 0.1

Encoder = Callable[["CollectorRegistry"], bytes]


class Collections:
    """Encodings of `registry`, one at a time in a thread of its own, shared by the scrapes that wait.

    `collect(encoder, content_type)` returns the bytes of a collection that
    started after the call. `started` counts collections begun, `waiting`
    the calls not yet answered (for tests and the bench). `close()` stops
    the thread once the running collection ends; calling it twice is safe.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")
        self._lock = asyncio.Lock()
        # The collection each content type's next scrapes share, until it starts.
        self._next: dict[str, asyncio.Task[bytes]] = {}
        self._flights: set[asyncio.Task[bytes]] = set()
        self._last_start = -MIN_COLLECTION_INTERVAL
        self.started = 0
        self.waiting = 0

    async def collect(self, encoder: Encoder, content_type: str) -> bytes:
        flight = self._next.get(content_type)
        if flight is None:
            flight = asyncio.get_running_loop().create_task(self._run(encoder, content_type))
            self._flights.add(flight)
            flight.add_done_callback(self._landed)
            self._next[content_type] = flight
        self.waiting += 1
        try:
            # Shielded: a scrape that goes away does not cancel what the others wait for.
            return await asyncio.shield(flight)
        finally:
            self.waiting -= 1

    async def _run(self, encoder: Encoder, content_type: str) -> bytes:
        async with self._lock:
            loop = asyncio.get_running_loop()
            pause = self._last_start + MIN_COLLECTION_INTERVAL - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)  # scrapes that arrive meanwhile share this collection
            # From here on this collection is under way: later scrapes start the next one.
            del self._next[content_type]
            self._last_start = loop.time()
            self.started += 1
            return await loop.run_in_executor(self._executor, encoder, self._registry)

    def _landed(self, flight: asyncio.Task[bytes]) -> None:
        self._flights.discard(flight)
        if not flight.cancelled():
            # Retrieved: a failed collection every scrape left (their clients went away)
            # must not be logged as "never retrieved"; the scrapes that waited log it.
            flight.exception()

    def close(self) -> None:
        for flight in self._flights:
            flight.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass(slots=True)
class _Request:
    method: str
    path: bytes
    accept: str
    keep_alive: bool
    too_large: bool


class _Connection(asyncio.Protocol):
    """One client connection: requests parsed as they come, answered in order by one task."""

    def __init__(self, endpoint: MetricsEndpoint) -> None:
        self._endpoint = endpoint
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._header = b""
        self._accept = b""
        self._request_bytes = 0  # received since the last complete request: bounds what a client sends
        self._header_bytes = 0  # of the request being parsed, which may have come in one read
        self._pending: list[_Request] = []
        self._answering: asyncio.Task[None] | None = None
        self._collecting = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False

    # -------------------------------------------------------- the transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._endpoint.opened(self)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._endpoint.closed(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._answering is not None:
            self._answering.cancel()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # closed, or draining what follows a refused request (`_fail`)
        self._request_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(b"400 Bad Request")
            return
        except httptools.HttpParserError:
            self._fail(b"400 Bad Request")
            return
        if self._request_bytes > MAX_REQUEST_BYTES:
            self._fail(b"431 Request Header Fields Too Large")

    @property
    def idle(self) -> bool:
        """Nothing asked and nothing being answered: what the endpoint may close for a newer one."""
        return not (self._closing or self._pending or self._answering or self._request_bytes)

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    # ----------------------------------------------------- parser callbacks

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if name.lower() == b"accept":
            self._accept = value

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode("ascii", "replace")
        path = self._url.split(b"?", 1)[0]
        accept = self._accept.decode("latin-1")
        too_large = self._header_bytes > MAX_REQUEST_BYTES
        self._pending.append(_Request(method, path, accept, self._parser.should_keep_alive(), too_large))
        self._url = self._accept = b""
        self._request_bytes = self._header_bytes = 0
        if len(self._pending) >= MAX_PIPELINED and self._transport is not None:
            self._transport.pause_reading()
        if self._answering is None:
            self._answering = asyncio.get_running_loop().create_task(self._answer())

    # ------------------------------------------------------------ answering

    async def _answer(self) -> None:
        try:
            while self._pending and not self._closing:
                request = self._pending.pop(0)
                if self._transport is not None and len(self._pending) < MAX_PIPELINED:
                    self._transport.resume_reading()
                if request.too_large:
                    self._fail(b"431 Request Header Fields Too Large")
                    return
                status, headers, body = await self._respond(request)
                if not request.keep_alive:
                    headers.append((b"Connection", b"close"))
                self._write(status, headers, body, with_body=request.method != "HEAD")
                await self._writable.wait()
                if not request.keep_alive:
                    self.close()
                    return
        except asyncio.CancelledError:
            return
        finally:
            self._answering = None
        if not self._closing:
            self._endpoint.answered(self)
            self._arm()

    async def _respond(self, request: _Request) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
        if request.path != b"/metrics":
            return b"404 Not Found", [(b"Content-Type", b"text/plain")], b"Not found: GET /metrics\n"
        if request.method not in ("GET", "HEAD"):
            return (
                b"405 Method Not Allowed",
                [(b"Allow", b"GET, HEAD"), (b"Content-Type", b"text/plain")],
                b"Method not allowed\n",
            )
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(request.accept)
        self._collecting = True
        try:
            body = await self._endpoint.collections.collect(encoder, content_type)
        except Exception as error:  # a collector failed; the next scrape tries again
            log.warning("prometheus: collection failed: %r", error)
            return b"500 Internal Server Error", [(b"Content-Type", b"text/plain")], b"collection failed\n"
        finally:
            self._collecting = False
        return b"200 OK", [(b"Content-Type", content_type.encode("latin-1"))], body

    def _write(
        self, status: bytes, headers: list[tuple[bytes, bytes]], body: bytes, *, with_body: bool = True
    ) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        lines = [b"HTTP/1.1 " + status, *(name + b": " + value for name, value in headers)]
        lines.append(b"Content-Length: " + str(len(body)).encode())
        self._transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + (body if with_body else b""))

    def _fail(self, status: bytes) -> None:
        """Answer a request we will not serve, and close (what follows it cannot be parsed).

        The close lingers: the answer goes out with our end shut for writing,
        and what the client still sends is read and dropped until it closes
        too (asyncio closes a transport at the peer's end of file), or
        `LINGER_SECONDS` pass. Closed at once, a socket with unread
        bytes is reset, and the reset can destroy the answer on its way: a
        client still sending a 64 KiB header got ECONNRESET instead of its
        431 (seen under load, issue 18 finding 12).
        """
        self._pending.clear()
        if self._answering is not None and self._answering is not asyncio.current_task():
            self._answering.cancel()
        self._write(status, [(b"Connection", b"close")], b"")
        self._closing = True
        transport = self._transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            self.close()
            return
        transport.write_eof()
        transport.resume_reading()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.close)

    # -------------------------------------------------------- the idle timer

    def _arm(self) -> None:
        """Close the connection unless it completes a request in `KEEPALIVE_SECONDS`.

        Reset when an answer has been written, not by bytes arriving: a client
        sending a header a byte a minute is closed like a silent one.
        """
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(KEEPALIVE_SECONDS, self._expire)

    def _expire(self) -> None:
        if self._collecting:
            self._arm()  # waiting on us, not on the client
        else:
            self.close()


class MetricsEndpoint:
    """`GET /metrics` on `listen` (HOST:PORT); `start` it, `close` it (twice is safe)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.collections = Collections(registry)
        self._server: asyncio.Server | None = None
        # In order of their last answer (or opening): the first idle one has waited longest.
        self._connections: dict[_Connection, None] = {}

    @classmethod
    async def start(cls, listen: str, registry: CollectorRegistry) -> MetricsEndpoint:
        """Listen on `listen`; `PrometheusListenError` when that cannot be done."""
        endpoint = cls(registry)
        host, _, port = listen.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            endpoint._server = await loop.create_server(
                lambda: _Connection(endpoint), host.strip("[]"), int(port), backlog=LISTEN_BACKLOG
            )
        except (OSError, UnicodeError, ValueError) as error:
            endpoint.collections.close()
            raise PrometheusListenError(f"cannot listen on {listen} for Prometheus: {error}") from error
        log.info("prometheus: http://%s:%d/metrics", host, endpoint.port)
        return endpoint

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def opened(self, connection: _Connection) -> None:
        self._connections[connection] = None
        if len(self._connections) > MAX_CONNECTIONS:
            oldest = next((c for c in self._connections if c.idle and c is not connection), None)
            victim = oldest or connection
            victim.close()
            self._connections.pop(victim, None)  # now: its connection_lost comes later

    def answered(self, connection: _Connection) -> None:
        if connection in self._connections:
            del self._connections[connection]
            self._connections[connection] = None

    def closed(self, connection: _Connection) -> None:
        self._connections.pop(connection, None)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for connection in list(self._connections):
                connection.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        self.collections.close()
