"""Server-sent events as OpenAI-compatible servers stream them: `data: {json}` lines, `data: [DONE]`."""

from __future__ import annotations

import orjson

from lemonade_grpc.backends.chunks import Chunk, MalformedEvent, error_message, parse_chunk
from lemonade_grpc.backends.http import BackendHTTPError

# The longest SSE line we buffer: an event carries one delta (a token, a few
# bytes); a backend that never ends its line must not grow us without end.
MAX_LINE_BYTES = 16 << 20


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
                raise BackendHTTPError(500, error_message(line[7:].decode("utf-8", "replace")))
        return chunks
