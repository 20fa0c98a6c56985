"""The backend client's parsing of SSE events, including malformed and error events."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lemonade_grpc.backends.chunks import MalformedEvent, parse_chunk
from lemonade_grpc.backends.http import BackendHTTPError
from lemonade_grpc.backends.sse import MAX_LINE_BYTES, SSEDecoder


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


BODY = (
    b'data: {"choices":[{"text":"he","finish_reason":null}]}\n\n'
    b": a comment line\n\n"
    b'data: {"choices":[{"text":"llo","finish_reason":null}]}\r\n\r\n'
    b'data: {"choices":[{"text":"","finish_reason":"length"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    b"data: [DONE]\n\n"
)


@given(cuts=st.lists(st.integers(min_value=1, max_value=len(BODY) - 1), unique=True, max_size=12))
def test_sse_decoder_gives_the_same_events_however_the_body_is_split(cuts: list[int]) -> None:
    decoder = SSEDecoder()
    chunks = []
    bounds = [0, *sorted(cuts), len(BODY)]
    for start, end in itertools.pairwise(bounds):
        chunks.extend(decoder.feed(BODY[start:end]))
    assert [c.text for c in chunks] == ["he", "llo", ""]
    assert [c.is_last for c in chunks] == [False, False, True]
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("length", 2)
    assert decoder.done


def test_sse_decoder_raises_on_an_error_line_and_a_malformed_event() -> None:
    with pytest.raises(BackendHTTPError) as error_line:
        SSEDecoder().feed(b'error: {"error":{"code":500,"message":"slot crashed"}}\n\n')
    assert error_line.value.message == "slot crashed"
    with pytest.raises(BackendHTTPError) as malformed:
        SSEDecoder().feed(b"data: {not json\n\n")
    assert malformed.value.status == 502


@pytest.mark.parametrize(
    "event",
    [
        [1, 2],
        None,
        {"choices": "abc"},
        {"choices": [{"text": 5}]},
        {"choices": [{"text": "x", "finish_reason": ["stop"]}]},
        {"choices": [], "usage": {"completion_tokens": -1}},
        {"choices": [], "usage": {"prompt_tokens": 1 << 40}},
        {"choices": [], "usage": {"completion_tokens": True}},
        {"choices": [], "timings": {"prompt_ms": "fast"}},
        {"choices": [], "timings": {"predicted_per_second": float("nan")}},
    ],
    ids=repr,
)
def test_an_event_of_the_wrong_shape_is_a_backend_fault(event: object) -> None:
    # A backend's malformed output is its fault (BACKEND_ERROR), never an
    # exception of ours that ends as INTERNAL.
    with pytest.raises(MalformedEvent) as malformed:
        parse_chunk(event)
    assert malformed.value.status == 502


def test_an_error_event_with_an_odd_code_is_still_an_error() -> None:
    with pytest.raises(BackendHTTPError) as error:
        parse_chunk({"error": {"code": "abc", "message": "boom"}})
    assert (error.value.status, error.value.message) == (500, "boom")


def test_a_line_that_never_ends_is_refused_before_it_grows_without_end() -> None:
    decoder = SSEDecoder()
    piece = b"x" * (1 << 20)
    for _ in range(MAX_LINE_BYTES // len(piece)):
        decoder.feed(piece)  # up to the limit: buffered
    with pytest.raises(MalformedEvent):
        decoder.feed(piece)
