"""HTTP/1.1 to a backend, one request per connection: the exchange, its bytes and its errors.

`Exchange` is the asyncio protocol of one request and its response,
parsed as it arrives by httptools (llhttp's binding), with flow control
(a consumer that falls behind stops the reading). `OpenAIClient` opens
them; nothing here knows the OpenAI API.
"""

from __future__ import annotations

import asyncio
import re
import select
import socket
from collections.abc import Mapping
from typing import cast

import httptools


class BackendHTTPError(Exception):
    """The backend answered a request with an error status or an error event."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"backend answered {status}: {message}")
        self.status = status
        self.message = message


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


# Body bytes read but not yet taken before the connection is no longer
# read: a slow consumer slows the backend through TCP flow control.
READ_BUFFER_BYTES = 1 << 16
CONNECT_SECONDS = 10.0


class Exchange(asyncio.Protocol):
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


def writable(sock: socket.socket) -> bool:
    """Whether `sock` can be written now (its connection is made), without waiting."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


def request_bytes(
    method: bytes, path: str, host: bytes, body: bytes, headers: Mapping[str, str] | None
) -> bytes:
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
