"""The OpenAI API's streamed completion events, parsed into `Chunk`s (and its error bodies read).

Pure functions over decoded JSON: what /v1/completions and
/v1/chat/completions send per event, checked for shape and range (a
malformed event is the backend's fault, never a bug of ours).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lemonade_grpc.backends.http import BackendHTTPError


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


def error_message(body: str) -> str:
    """The `error.message` of an OpenAI-style error body, else the body itself."""
    try:
        decoded = json.loads(body)
    except ValueError:
        return body.strip()[:2000]
    error = decoded.get("error") if isinstance(decoded, dict) else None
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return body.strip()[:2000]
