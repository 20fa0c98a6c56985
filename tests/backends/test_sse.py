"""Server-sent events as OpenAI-compatible servers stream them: split anywhere, malformed, endless."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lemonade_grpc.backends.chunks import MalformedEvent
from lemonade_grpc.backends.http import BackendHTTPError
from lemonade_grpc.backends.sse import MAX_LINE_BYTES, SSEDecoder

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


def test_a_line_that_never_ends_is_refused_before_it_grows_without_end() -> None:
    decoder = SSEDecoder()
    piece = b"x" * (1 << 20)
    for _ in range(MAX_LINE_BYTES // len(piece)):
        decoder.feed(piece)  # up to the limit: buffered
    with pytest.raises(MalformedEvent):
        decoder.feed(piece)
