"""The OpenAI API's streamed completion events parsed into chunks, malformed and error events included.

The last test sends malformed events from a hostile backend through the
whole relay: each ends BACKEND_ERROR, never INTERNAL (issue 9).
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from conftest import ServerFactory, connect, read_all
from lemonade_grpc.backends.chunks import MalformedEvent, parse_chunk
from lemonade_grpc.backends.http import BackendHTTPError
from over_grpc import complete, hostile_model, wait_streams
from rpc_errors import error_info


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


# ------------------------------------------------------ the relay: malformed events from a backend


# "not-http" (answered BACKEND_ERROR since issue 18 finding 14) is the control: the rest answered INTERNAL.
MALFORMED = [
    "not-http",
    "http500-binary",
    "list",
    "null",
    "text-int",
    "choices-str",
    "error-code-str",
    "usage-negative",
    "usage-huge",
    "finish-list",
    "timings-str",
]


async def test_malformed_backend_events_end_backend_error_never_internal(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    config = "".join(
        hostile_model(mode.replace("-", "_"), tmp_path, tiny_model, "--mode", mode) for mode in MALFORMED
    )
    server = servers.start(f"[pool]\nmax_loaded = {{ llm = {len(MALFORMED)} }}\n" + config)
    outcomes = {}
    async with connect(server.address) as client:
        for mode in MALFORMED:
            try:
                await read_all(complete(client, mode.replace("-", "_")))
                outcomes[mode] = ("OK", "")
            except grpc.aio.AioRpcError as error:
                outcomes[mode] = (error.code().name, error_info(error).reason)
        await wait_streams(client, (0, 0))
    wrong = {mode: got for mode, got in outcomes.items() if got[1] in ("INTERNAL_ERROR", "")}
    assert not wrong, f"a backend's malformed stream answered as a bug of ours: {wrong} (all: {outcomes})"
