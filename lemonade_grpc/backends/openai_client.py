"""A streaming HTTP client for an OpenAI-compatible backend (llama-server's API).

One `aiohttp` session per backend, so connections are reused across requests
and closed with the backend. Streams are read line by line from the SSE body;
closing the response (what happens when the consumer stops iterating) closes
the connection, which is how llama-server learns to stop decoding.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp


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


def parse_chunk(event: Mapping[str, Any]) -> Chunk:
    """Turn one decoded SSE event of /v1/completions or /v1/chat/completions into a `Chunk`."""
    if "error" in event:
        error = event["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        code = error.get("code", 500) if isinstance(error, dict) else 500
        raise BackendHTTPError(int(code), str(message))
    chunk = Chunk("")
    choices = event.get("choices") or ()
    if choices:
        choice = choices[0]
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        chunk.text = text or ""
        chunk.finish_reason = choice.get("finish_reason")
    usage = event.get("usage")
    if isinstance(usage, dict):
        chunk.prompt_tokens = usage.get("prompt_tokens")
        chunk.completion_tokens = usage.get("completion_tokens")
    timings = event.get("timings")
    if isinstance(timings, dict):
        chunk.prompt_ms = timings.get("prompt_ms")
        chunk.tokens_per_second = timings.get("predicted_per_second")
    return chunk


class OpenAIClient:
    """HTTP client of one backend at `base_url`. `close` is idempotent."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily so that it binds to the running loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                self.base_url,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                connector=aiohttp.TCPConnector(limit=0),
            )
        return self._session

    async def health(self, limit_seconds: float = 5.0) -> int:
        """GET /health; return the HTTP status (llama-server: 503 while loading)."""
        limit = aiohttp.ClientTimeout(total=limit_seconds)
        async with self._get_session().get("/health", timeout=limit) as response:
            return response.status

    async def stream(self, path: str, payload: Mapping[str, Any]) -> AsyncIterator[Chunk]:
        """POST `payload` to `path` with streaming on; yield each event as a `Chunk`.

        Raises `BackendHTTPError` on an error status or error event, and
        aiohttp.ClientError when the connection breaks or the stream ends
        without `data: [DONE]`. Stopping the iteration early closes the
        connection.
        """
        body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
        async with self._get_session().post(path, json=body) as response:
            if response.status != 200:
                raise BackendHTTPError(response.status, _error_message(await response.text()))
            try:
                async for line in response.content:
                    if not line.startswith(b"data: "):
                        if line.startswith(b"error: "):
                            raise BackendHTTPError(500, _error_message(line[7:].decode("utf-8", "replace")))
                        continue
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        return
                    try:
                        event = json.loads(data)
                    except ValueError:
                        raise BackendHTTPError(502, f"malformed stream event: {data[:200]!r}") from None
                    yield parse_chunk(event)
            except RuntimeError as error:
                # aiohttp's StreamReader raises a bare RuntimeError("Connection
                # closed.") when the session is closed under a reader (the
                # backend crashed and was cleaned up): a broken connection.
                raise aiohttp.ClientConnectionError(str(error)) from error
            # The body ended without the terminator: the backend went away
            # mid-stream (a close-delimited body ends "cleanly" even then).
            raise aiohttp.ClientPayloadError("the backend's stream ended before data: [DONE]")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


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
