"""The OpenAI API's streamed completion events, parsed into `Chunk`s (and its error bodies read).

Pure functions over decoded JSON: what /v1/completions and
/v1/chat/completions send per event, checked for shape and range (a
malformed event is the backend's fault, never a bug of ours).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from lemonade_grpc.backends.http import BackendHTTPError


@dataclass(slots=True)
class ToolCallPiece:
    """A piece of a streamed tool call: `id` and `name` on its first piece, more `arguments` on each."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(slots=True)
class Alternative:
    """A token and its log-probability, as a stream's `logprobs` give it."""

    id: int
    text: str
    data: bytes
    logprob: float


@dataclass(slots=True)
class TokenLogprob:
    """A generated token's log-probability and the likeliest alternatives."""

    token: Alternative
    top: list[Alternative]


@dataclass(slots=True)
class Chunk:
    """One parsed SSE event of a completion stream.

    `text` is the delta (possibly empty), `reasoning` the delta of a
    thinking model's reasoning (`reasoning_content`), `tool_calls` the
    pieces of tool calls it carries (None: none); the other fields are set
    on the event that carries them (llama-server sends `finish_reason` and
    `timings` on the last content event and `usage` on a separate, final one).
    """

    text: str
    reasoning: str = ""
    tool_calls: list[ToolCallPiece] | None = None
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_ms: float | None = None
    tokens_per_second: float | None = None

    @property
    def has_delta(self) -> bool:
        """Whether it carries generated output (text, reasoning or a tool call's piece)."""
        return bool(self.text or self.reasoning or self.tool_calls or self.logprobs)

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
        logprobs = choice.get("logprobs")
        if logprobs is not None:
            chunk.logprobs = _logprobs(logprobs)
        if isinstance(delta, dict) and (len(delta) > 1 or "content" not in delta):  # reasoning, tool calls
            _chat_delta(delta, chunk)
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


# The most tool calls one answer may make (their `index`): far above what any model makes.
MAX_TOOL_CALLS = 1024


def _chat_delta(delta: dict[str, Any], chunk: Chunk) -> None:
    """What a chat delta carries besides its content: reasoning text and pieces of tool calls."""
    reasoning = delta.get("reasoning_content")
    if not isinstance(reasoning, str | None):
        raise MalformedEvent("reasoning_content must be a string")
    chunk.reasoning = reasoning or ""
    calls = delta.get("tool_calls")
    if calls is None:
        return
    if not isinstance(calls, list):
        raise MalformedEvent("tool_calls must be a list")
    pieces = []
    for call in calls:
        function = call.get("function", {}) if isinstance(call, dict) else None
        index = call.get("index") if isinstance(call, dict) else None
        if not isinstance(function, dict) or type(index) is not int or not 0 <= index < MAX_TOOL_CALLS:
            raise MalformedEvent("a tool call must be an object with an index in 0..1023 and a function")
        fields = (call.get("id"), function.get("name"), function.get("arguments"))
        if not all(isinstance(value, str | None) for value in fields):
            raise MalformedEvent("a tool call's id, name and arguments must be strings")
        call_id, name, arguments = (value or "" for value in fields)
        pieces.append(ToolCallPiece(index, call_id, name, arguments))
    chunk.tool_calls = pieces or None


def _logprobs(value: object) -> list[TokenLogprob] | None:
    """`choice.logprobs` (`{"content": [{"id", "token", "bytes", "logprob", "top_logprobs"}]}`)."""
    content = value.get("content") if isinstance(value, dict) else None
    if not isinstance(content, list):
        raise MalformedEvent("logprobs must hold a content list")
    tokens = []
    for entry in content:
        top = entry.get("top_logprobs", []) if isinstance(entry, dict) else None
        if not isinstance(top, list):
            raise MalformedEvent("top_logprobs must be a list")
        tokens.append(TokenLogprob(_alternative(entry), [_alternative(item) for item in top]))
    return tokens or None


def _alternative(entry: object) -> Alternative:
    if not isinstance(entry, dict):
        raise MalformedEvent("a token's logprob must be an object")
    token_id, text, data, logprob = (entry.get(k) for k in ("id", "token", "bytes", "logprob"))
    if logprob is None:
        logprob = -math.inf  # a probability of 0: JSON has no -inf, llama-server writes null
    if (
        type(token_id) is not int
        or not 0 <= token_id <= _COUNT_MAX
        or not isinstance(text, str)
        or not isinstance(logprob, int | float)
        or isinstance(logprob, bool)
        or not -math.inf <= logprob <= 0
    ):
        raise MalformedEvent("a token's logprob needs an id, its text and a log-probability of 0 or less")
    if data is None:
        raw = text.encode("utf-8", "surrogatepass")
    elif isinstance(data, list) and all(type(b) is int and 0 <= b <= 255 for b in data):
        raw = bytes(data)
    else:
        raise MalformedEvent("a token's bytes must be a list of byte values")
    return Alternative(token_id, text, raw, float(logprob))


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
