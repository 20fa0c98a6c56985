"""Memory that creeps under churn (issue 18 finding 15): what a backend request leaves to the collector.

The server collects its oldest generation rarely (`server.GC_THRESHOLD`,
issue 13), so an object that ends in a reference cycle after living
through a young collection waits minutes to be freed: the soak's RSS
crept while such cycles piled up. Each backend request (a token stream,
a health check) made one: the exchange held its httptools parser, whose
callbacks hold the exchange, and a stream broken by the backend kept the
error it raised, whose traceback holds the frame holding the exchange.
Counted here with the collector switched off: N requests must leave no
exchange behind, whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httptools
import pytest

from lemonade_grpc.backends.http import BackendConnectionError, BackendHTTPError, Exchange
from lemonade_grpc.backends.openai_client import OpenAIClient

REQUESTS = 25

Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]


def left_behind() -> int:
    """Exchanges and parsers the garbage collector still tracks (alive, or cyclic garbage)."""
    return sum(isinstance(o, Exchange | httptools.HttpResponseParser) for o in gc.get_objects())


@contextlib.contextmanager
def no_cyclic_collection() -> Iterator[None]:
    """Only reference counting frees memory meanwhile: what a cycle holds stays, countable."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


@contextlib.asynccontextmanager
async def backend(answer: Answer) -> AsyncIterator[OpenAIClient]:
    """A client of a server that reads each request's head and answers with `answer`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line[15:])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            await reader.readexactly(length)
            await answer(writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    client = OpenAIClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        yield client
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


def sse(*texts: str) -> bytes:
    events = [{"choices": [{"text": text, "finish_reason": None}]} for text in texts]
    events.append({"choices": [{"text": "", "finish_reason": "length"}]})
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


async def streamed(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + sse("a", "b"))
    await writer.drain()


async def cut_mid_body(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n" + sse("a")[:20])
    await writer.drain()
    writer.transport.abort()


async def refused(writer: asyncio.StreamWriter) -> None:
    body = b'{"error": {"message": "no", "code": 400}}'
    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()


async def gone_before_answering(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


async def healthy(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()


async def read_stream(client: OpenAIClient, *, leave_after: int | None = None) -> int:
    """Read a completion stream (leaving it after `leave_after` batches, closed as the relay closes it)."""
    batches = 0
    stream = client.stream("/v1/completions", {"prompt": "p", "max_tokens": 2})
    async with contextlib.aclosing(stream):
        async for _ in stream:
            batches += 1
            if batches == leave_after:
                break
    return batches


CASES = ["stream", "stream-left-early", "cut-mid-body", "gone-before-answering", "error-status", "health"]


@pytest.mark.parametrize("case", CASES)
async def test_finding_15_a_finished_backend_request_leaves_no_cycle_behind(case: str) -> None:
    answer = {
        "stream": streamed,
        "stream-left-early": streamed,
        "cut-mid-body": cut_mid_body,
        "gone-before-answering": gone_before_answering,
        "error-status": refused,
        "health": healthy,
    }[case]
    async with backend(answer) as client:
        with no_cyclic_collection():
            before = left_behind()
            for _ in range(REQUESTS):
                if case == "stream":
                    assert await read_stream(client) >= 1
                elif case == "stream-left-early":
                    assert await read_stream(client, leave_after=1) == 1
                elif case in ("cut-mid-body", "gone-before-answering"):
                    with pytest.raises(BackendConnectionError):
                        await read_stream(client)
                elif case == "error-status":
                    with pytest.raises(BackendHTTPError):
                        await read_stream(client)
                else:
                    assert await client.health(5) == 200
            # Each connection's end (asyncio's connection_lost) runs at the loop's next turns.
            for _ in range(5):
                await asyncio.sleep(0)
            assert left_behind() - before == 0
