"""A fake OpenAI-compatible model server, for faults a real llama-server cannot show.

Speaks the subset of llama-server's HTTP protocol that lemonade-grpc uses:
`GET /health` (503 while "loading"), streaming `POST /v1/completions` and
`/v1/chat/completions` (SSE), `POST /v1/rerank` (a document scores the
query's words it holds), `POST /v1/embeddings` (two numbers per input),
`POST /tokenize` (a token per word), and `GET /slots`; `--answer-seconds`
delays the answers of those three. Standard library only, so it starts in
tens of milliseconds.

Faults: `--load-seconds` (slow load), `--fail-start` (exit at once; with
`--fail-start-while FILE`, while FILE exists),
`--crash-after-tokens` (exit mid-stream), `--ignore-sigterm`,
`--token-seconds` (slow generation), `--exit-after-seconds` (crash on a
timer, again at every restart), `--token-bytes` (big deltas, to fill
buffers), `--listen-delay-seconds` (bind the port late, after a
start-up pause), `--busy-health-seconds` (answer /health that much later
while generating: busy, not hung), `--not-http-requests N` (answer the
first N generation requests with bytes that are not HTTP, then serve),
`POST /unlisten` (close the listening socket and stay alive: a backend that
refuses connections while the pool has seen no exit).
Each token's text names the prompt, so concurrent streams can be
told apart. `GET /slots` reports `tokens_sent`. `--pid-log FILE` appends this process's
pid at start, a timeline of every process that ever ran.

Loud: `--stderr-bytes-per-token N` writes N bytes to stderr before each token,
blocking when the pipe is full as a real server's logger does (issue 18
finding 7); `--spew-stderr-bytes N` writes N bytes to stderr at start, before
the port is bound, so a load's end means they were written (issue 18 finding 6:
logs that would fill a disk).

Scripted (issue 19: what llama-server sends for tool calls or reasoning,
which the real small model cannot be made to send): `--script FILE`
answers every generation with FILE's bytes (SSE events as llama-server
writes them), `--split-bytes N` in writes of N bytes (split anywhere, even
inside a UTF-8 character); `--request-log FILE` appends each generation
request's body, so a test sees what was sent.

Stepped by the test (issue 18 finding 12: time and pacing driven by the test,
not guessed): `--stepped` makes each token wait for a permit that
`POST /release` (body `{"tokens": N}`) gives; the release answers once those
N tokens are written (or the generation ended), and `GET /slots` says
`waiting` while a generation waits for one. A generation whose client goes
away while it waits ends at once. `--ready-file FILE`: /health answers 503
(loading) until FILE exists, so a test decides when a load ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--ctx-size", type=int, default=4096)
    parser.add_argument("--load-seconds", type=float, default=0.0)
    parser.add_argument("--token-seconds", type=float, default=0.0)
    parser.add_argument("--fail-start", action="store_true")
    parser.add_argument("--fail-start-while", type=Path)  # exit at once while this file exists
    parser.add_argument("--crash-after-tokens", type=int, default=-1)
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--exit-after-seconds", type=float, default=-1.0)
    parser.add_argument("--token-bytes", type=int, default=0)
    parser.add_argument("--listen-delay-seconds", type=float, default=0.0)
    parser.add_argument("--busy-health-seconds", type=float, default=0.0)
    parser.add_argument("--not-http-requests", type=int, default=0)
    parser.add_argument("--stderr-bytes-per-token", type=int, default=0)
    parser.add_argument("--spew-stderr-bytes", type=int, default=0)
    parser.add_argument("--pid-log", type=Path)
    parser.add_argument("--stepped", action="store_true")
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument("--script", type=Path)  # answer every generation with these SSE bytes
    parser.add_argument("--split-bytes", type=int, default=0)  # ... written this many bytes at a time
    parser.add_argument("--answer-seconds", type=float, default=0.0)  # before each JSON answer
    parser.add_argument("--request-log", type=Path)  # append each generation request's body (a JSON line)
    args, _ = parser.parse_known_args(argv)  # extra backend args are accepted and ignored
    return args


class FakeBackend:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ready_at = time.monotonic() + args.load_seconds
        self.processing = 0
        self.tokens_sent = 0
        # --stepped: tokens the test released and not yet written; generations waiting for one.
        self.permits = 0
        self.waiting = 0
        self.ended = 0  # generations ended, however
        self._change = asyncio.Event()  # set (and replaced) at each change of the three
        self.not_http_left = args.not_http_requests
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            await self.route(method, path, body, writer, reader)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def route(
        self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter, reader: asyncio.StreamReader
    ) -> None:
        if path == "/health":
            if self.processing and self.args.busy_health_seconds:
                await asyncio.sleep(self.args.busy_health_seconds)
            loading = time.monotonic() < self.ready_at or (
                self.args.ready_file is not None and not self.args.ready_file.exists()
            )
            status = (
                (503, '{"error":{"code":503,"message":"Loading model"}}')
                if loading
                else (200, '{"status":"ok"}')
            )
            await respond(writer, *status)
        elif path == "/slots":
            slot = {
                "id": 0,
                "is_processing": self.processing > 0,
                "tokens_sent": self.tokens_sent,
                "waiting": self.waiting,
            }
            await respond(writer, 200, json.dumps([slot]))
        elif method == "POST" and path in ("/v1/rerank", "/v1/embeddings", "/tokenize"):
            await asyncio.sleep(self.args.answer_seconds)
            await respond(writer, 200, json.dumps(VECTOR_ROUTES[path](json.loads(body))))
        elif method == "POST" and path == "/unlisten":
            # Stop listening and stay alive: connections are refused, and no exit says why.
            await respond(writer, 200, "{}")
            if self.server is not None:
                self.server.close()
        elif method == "POST" and path == "/release":
            await self.release(int(json.loads(body)["tokens"]))
            await respond(writer, 200, json.dumps({"tokens_sent": self.tokens_sent}))
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            if self.args.request_log is not None:
                with self.args.request_log.open("ab") as log:
                    log.write(body + b"\n")
            if self.args.script is not None:
                await scripted(writer, self.args.script.read_bytes(), self.args.split_bytes)
                return
            if self.not_http_left > 0:
                self.not_http_left -= 1
                writer.write(b"SSH-2.0-not-http\r\n\r\n")
                await writer.drain()
                return
            await self.generate(
                json.loads(body or b"{}"),
                chat=path.endswith("chat/completions"),
                writer=writer,
                reader=reader,
            )
        else:
            await respond(writer, 404, '{"error":{"code":404,"message":"not found"}}')

    async def release(self, tokens: int) -> None:
        """Let `tokens` more tokens out; return once they are written or the generation ended."""
        ended = self.ended
        self.permits += tokens
        self.changed()
        await self.until(lambda: (self.permits == 0 and self.waiting > 0) or self.ended != ended)

    async def permit(self, reader: asyncio.StreamReader) -> None:
        """Take a released token, waiting for one; ConnectionError if the client goes away meanwhile."""
        gone = asyncio.ensure_future(reader.read(1))  # b"": the client closed its end
        self.waiting += 1
        self.changed()
        try:
            while self.permits == 0:
                granted = asyncio.ensure_future(self.until(lambda: self.permits > 0))
                await asyncio.wait({granted, gone}, return_when=asyncio.FIRST_COMPLETED)
                granted.cancel()
                if gone.done():
                    raise ConnectionError("the client went away")
            self.permits -= 1
        finally:
            self.waiting -= 1
            gone.cancel()

    def changed(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    async def until(self, holds: Callable[[], bool]) -> None:
        while not holds():
            await self._change.wait()

    async def generate(
        self,
        request: dict[str, object],
        *,
        chat: bool,
        writer: asyncio.StreamWriter,
        reader: asyncio.StreamReader,
    ) -> None:
        max_tokens = int(str(request.get("max_tokens", 16)))
        prompt = request.get("prompt") or json.dumps(request.get("messages"))
        tag = str(prompt)[:8]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        self.processing += 1
        try:
            for index in range(max_tokens):
                if self.args.stepped:
                    await self.permit(reader)
                if self.args.crash_after_tokens >= 0 and self.tokens_sent >= self.args.crash_after_tokens:
                    os._exit(3)
                if self.args.stderr_bytes_per_token:
                    write_stderr(self.args.stderr_bytes_per_token, f"token {index}")
                text = f"{tag}{index} " + "x" * self.args.token_bytes
                choice = {"delta": {"content": text}} if chat else {"text": text}
                writer.write(sse({"choices": [{**choice, "index": 0, "finish_reason": None}]}))
                await writer.drain()
                self.tokens_sent += 1
                if self.args.stepped:
                    self.changed()
                if self.args.token_seconds:
                    await asyncio.sleep(self.args.token_seconds)
            final = {
                "choices": [{"text": "", "index": 0, "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": max_tokens},
                "timings": {"prompt_ms": 0.1, "predicted_per_second": 1000.0},
            }
            writer.write(sse(final) + b"data: [DONE]\n\n")
            await writer.drain()
        finally:
            self.processing -= 1
            self.ended += 1
            self.changed()


def write_stderr(count: int, label: str) -> None:
    """`count` bytes to stderr in lines of at most 64 KiB, each a blocking write, as a logger writes."""
    while count > 0:
        size = min(count, 65536)
        line = (f"{label} " + "y" * size)[: size - 1].encode() + b"\n"
        view = memoryview(line)
        while view:
            view = view[os.write(2, view) :]
        count -= size


def rerank(request: Mapping[str, object]) -> dict[str, object]:
    """llama-server's /v1/rerank answer, scoring a document by the query's words it holds (best first)."""
    query = set(str(request["query"]).lower().split())
    documents = [str(d) for d in request["documents"]]  # type: ignore[attr-defined]
    scores = [len(query & set(d.lower().split())) - i / 1000 for i, d in enumerate(documents)]
    results = sorted(
        ({"index": i, "relevance_score": s} for i, s in enumerate(scores)),
        key=lambda r: -r["relevance_score"],
    )
    top_n = request.get("top_n")
    return {
        "model": "fake",
        "object": "list",
        "usage": {"prompt_tokens": sum(len(d.split()) for d in documents), "total_tokens": 0},
        "results": results[:top_n] if isinstance(top_n, int) else results,
    }


def embeddings(request: Mapping[str, object]) -> dict[str, object]:
    """llama-server's /v1/embeddings answer: per input, its length and word count (2 numbers)."""
    inputs = request.get("input")
    texts = [str(text) for text in inputs] if isinstance(inputs, list) else [str(inputs)]
    data = [
        {"index": i, "object": "embedding", "embedding": [float(len(text)), float(len(text.split()))]}
        for i, text in enumerate(texts)
    ]
    return {"object": "list", "data": data, "usage": {"prompt_tokens": sum(len(t.split()) for t in texts)}}


def tokenize(request: Mapping[str, object]) -> dict[str, object]:
    """llama-server's /tokenize answer: a token per word."""
    return {"tokens": list(range(len(str(request.get("content", "")).split())))}


VECTOR_ROUTES: dict[str, Callable[[Mapping[str, object]], dict[str, object]]] = {
    "/v1/rerank": rerank,
    "/v1/embeddings": embeddings,
    "/tokenize": tokenize,
}


async def scripted(writer: asyncio.StreamWriter, body: bytes, split: int) -> None:
    """An SSE answer of exactly `body`, written `split` bytes at a time (all at once for 0)."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
    step = split or len(body) or 1
    for start in range(0, len(body), step):
        writer.write(body[start : start + step])
        await writer.drain()
        await asyncio.sleep(0)  # a write each: the reader sees the pieces apart


def sse(event: Mapping[str, object]) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def respond(writer: asyncio.StreamWriter, status: int, body: str) -> None:
    payload = body.encode()
    writer.write(
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        f"Connection: close\r\n\r\n".encode()
        + payload
    )
    await writer.drain()


async def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.pid_log:
        with args.pid_log.open("a") as log:
            log.write(f"{os.getpid()}\n")
    if args.fail_start or (args.fail_start_while is not None and args.fail_start_while.exists()):
        print("fake backend: failing at start as asked", file=sys.stderr)
        return 3
    if not args.model.exists():
        print(f"fake backend: no model at {args.model}", file=sys.stderr)
        return 2
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    backend = FakeBackend(args)
    if args.exit_after_seconds >= 0:
        asyncio.get_running_loop().call_later(args.exit_after_seconds, os._exit, 4)
    if args.listen_delay_seconds:
        await asyncio.sleep(args.listen_delay_seconds)
    write_stderr(args.spew_stderr_bytes, "spew")
    backend.server = await asyncio.start_server(backend.handle, "127.0.0.1", args.port)
    await asyncio.Event().wait()  # until a signal ends the process (listening or not: /unlisten)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
