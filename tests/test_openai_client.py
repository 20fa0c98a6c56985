"""The backend client's parsing of SSE events, including malformed and error events."""

from __future__ import annotations

import pytest

from lemonade_grpc.backends.openai_client import BackendHTTPError, parse_chunk


def test_completion_and_chat_deltas() -> None:
    assert parse_chunk({"choices": [{"text": "hi", "finish_reason": None}]}).text == "hi"
    chat = parse_chunk({"choices": [{"delta": {"content": "yo"}, "finish_reason": "stop"}]})
    assert chat.text == "yo"
    assert chat.finish_reason == "stop"


def test_usage_and_timings_on_the_last_event() -> None:
    last = parse_chunk(
        {
            "choices": [{"text": "", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 9},
            "timings": {"prompt_ms": 1.5, "predicted_per_second": 1234.0},
        }
    )
    assert (last.prompt_tokens, last.completion_tokens) == (3, 9)
    assert (last.prompt_ms, last.tokens_per_second) == (1.5, 1234.0)


def test_an_error_event_raises_with_its_code_and_message() -> None:
    with pytest.raises(BackendHTTPError) as raised:
        parse_chunk({"error": {"code": 400, "message": "the prompt is too long"}})
    assert raised.value.status == 400
    assert raised.value.message == "the prompt is too long"
