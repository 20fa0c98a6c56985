"""The backend HTTP client (httptools, a connection per request) against scripted HTTP servers.

Each test runs a small asyncio server that reads the request and answers
bytes of its choosing: framing (chunked, Content-Length, close-delimited),
error statuses, a connection cut mid-body, something that is not HTTP.
"""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from lemonade_grpc.backends.backend import free_port
from lemonade_grpc.backends.chunks import Chunk
from lemonade_grpc.backends.http import BackendConnectionError, BackendHTTPError, MalformedResponse
from lemonade_grpc.backends.openai_client import OpenAIClient

Answer = Callable[[bytes, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


@asynccontextmanager
async def scripted(answer: Answer) -> AsyncIterator[tuple[OpenAIClient, list[bytes]]]:
    """A client of a server that records each request and answers it with `answer`."""
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_request(reader)
            requests.append(request)
            await answer(request, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = OpenAIClient(f"http://127.0.0.1:{port}")
    try:
        yield client, requests
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


def sse(*events: object) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def chunked(body: bytes, size: int) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def collect(client: OpenAIClient, **kw: object) -> list[Chunk]:
    chunks: list[Chunk] = []
    async for batch in client.stream("/v1/completions", {"prompt": "p", "max_tokens": 3}, **kw):  # type: ignore[arg-type]
        chunks += batch
    return chunks


EVENTS = (
    {"choices": [{"text": "a", "finish_reason": None}]},
    {"choices": [{"text": "b", "finish_reason": None}]},
    {
        "choices": [{"text": "", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2},
    },
)


@pytest.mark.parametrize("size", [1, 7, 4096])
async def test_a_chunked_event_stream_split_anywhere_is_read_whole(size: int) -> None:
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        body = chunked(sse(*EVENTS), size)
        for i in range(0, len(body), 5):  # in pieces, as a backend's writes arrive
            writer.write(body[i : i + 5])
            await writer.drain()

    async with scripted(answer) as (client, requests):
        chunks = await collect(client, headers={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    assert "".join(c.text for c in chunks) == "ab"
    assert chunks[-1].completion_tokens == 2
    [request] = requests
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert b"\r\nConnection: close" in head
    assert b"\r\ntraceparent: 00-" in head
    assert json.loads(body) == {
        "prompt": "p",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_a_header_value_that_could_split_the_request_is_not_sent() -> None:
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    async with scripted(answer) as (client, requests):
        with pytest.raises(BackendConnectionError, match=r"ended before data: \[DONE\]"):
            await collect(client, headers={"x-a": "1\r\nx-injected: 1", "x-b": "fine"})
    assert b"x-injected" not in requests[0]
    assert b"\r\nx-b: fine\r\n" in requests[0]


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: %d\r\n\r\n", b"Connection: close\r\n\r\n"],
    ids=["content-length", "close-delimited"],
)
async def test_an_error_status_is_reported_with_the_bodys_message(framing: bytes) -> None:
    body = json.dumps({"error": {"message": "context too long", "code": 400}}).encode()

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        head = b"HTTP/1.1 400 Bad Request\r\n" + (framing % len(body) if b"%d" in framing else framing)
        writer.write(head + body)

    async with scripted(answer) as (client, _):
        with pytest.raises(BackendHTTPError) as raised:
            await collect(client)
    assert (raised.value.status, raised.value.message) == (400, "context too long")


async def test_a_connection_cut_mid_body_is_a_broken_connection() -> None:
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(chunked(sse(EVENTS[0]), 4096)[:30])  # part of the first chunk, then gone
        await writer.drain()
        writer.transport.abort()

    async with scripted(answer) as (client, _):
        with pytest.raises(BackendConnectionError):
            await collect(client)


NOT_HTTP = {
    "status-line": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "header": b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    # A first chunk holding an event, then a chunk size that is not hexadecimal.
    "chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    + chunked(b"data: " + json.dumps(EVENTS[0]).encode() + b"\n\n", 4096)[:-5]
    + b"zz\r\n",
}


@pytest.mark.parametrize("where", list(NOT_HTTP))
async def test_finding_14_an_answer_that_is_not_http_fails_the_request_not_the_connection(where: str) -> None:
    """A request's answer that is not HTTP is the backend failing it (a 502), not a broken connection.

    issue 18 finding 14: it was a BackendConnectionError, which the relay
    reports BACKEND_CRASHED; the backend had not crashed. To a health check
    a head that is not HTTP is still a failed check.
    """

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(NOT_HTTP[where])
        await writer.drain()

    async with scripted(answer) as (client, _):
        with pytest.raises(MalformedResponse, match="not valid HTTP") as raised:
            await collect(client)
        assert raised.value.status == 502
        assert not isinstance(raised.value, BackendConnectionError)
        if where != "chunk-size":  # a health check reads the head alone
            with pytest.raises(BackendConnectionError, match="not valid HTTP"):
                await client.health(2)


async def test_health_answers_the_status() -> None:
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        assert request.startswith(b"GET /health HTTP/1.1\r\n")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 7\r\n\r\nloading")

    async with scripted(answer) as (client, requests):
        assert await client.health(2) == 503
    assert len(requests) == 1


async def test_a_refused_connection_says_so_and_keeps_the_os_error() -> None:
    client = OpenAIClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(BackendConnectionError) as raised:
        await client.health(2)
    assert raised.value.os_error is not None
    assert raised.value.os_error.errno == errno.ECONNREFUSED
    await client.close()


async def test_closing_the_client_breaks_a_stream_in_flight() -> None:
    sent = asyncio.Event()

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked(sse(EVENTS[0])[:-14], 4096)[:-5]
        )
        await writer.drain()
        sent.set()
        await asyncio.sleep(30)  # never ends the body

    async with scripted(answer) as (client, _):
        reading = asyncio.ensure_future(collect(client))
        await sent.wait()
        await client.close()
        with pytest.raises(BackendConnectionError):
            await asyncio.wait_for(reading, 10)
