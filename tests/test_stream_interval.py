"""The stream interval (`[limits] stream_interval_ms`): the first delta at once, then a message per interval.

Issue 13: one gRPC message (and one backend read) per token was most of the
proxy's cost. `Pacer` decides when the next read of the backend's stream may
happen; the relay sends what that read brought as one message.
"""

from __future__ import annotations

from pathlib import Path

from conftest import ServerFactory, connect, fake_model, read_all
from lemonade_grpc._gen.lemonade.v1 import inference_pb2
from lemonade_grpc.backends.openai_client import Chunk, Pacer

INTERVAL = 0.005


def text(*pieces: str) -> list[Chunk]:
    return [Chunk(piece) for piece in pieces]


def test_the_first_text_is_never_held() -> None:
    pacer = Pacer(INTERVAL, None)
    assert pacer.hold_until(text("a"), 100.0) == 0.0


def test_a_batch_without_text_neither_holds_nor_counts_as_the_first() -> None:
    pacer = Pacer(INTERVAL, None)
    assert pacer.hold_until([Chunk("")], 100.0) == 0.0  # a chat stream's role delta
    assert pacer.hold_until(text("a"), 100.001) == 0.0  # still the first text


def test_deltas_faster_than_the_interval_are_held_until_it_has_passed() -> None:
    pacer = Pacer(INTERVAL, None)
    pacer.hold_until(text("a"), 100.0)
    assert pacer.hold_until(text("b"), 100.001) == 100.001 + INTERVAL
    assert pacer.hold_until(text("c", "d", "e"), 100.007) == 100.007 + INTERVAL


def test_several_deltas_in_the_first_read_mean_a_fast_stream() -> None:
    assert Pacer(INTERVAL, None).hold_until(text("a", "b"), 100.0) == 100.0 + INTERVAL


def test_a_stream_slower_than_the_interval_is_never_held() -> None:
    pacer = Pacer(INTERVAL, None)
    for step in range(5):
        assert pacer.hold_until(text("x"), 100.0 + step * 0.05) == 0.0


def test_the_end_is_never_held() -> None:
    pacer = Pacer(INTERVAL, None)
    pacer.hold_until(text("a"), 100.0)
    assert pacer.hold_until([Chunk("b", finish_reason="stop")], 100.001) == 0.0


def test_nothing_is_held_once_max_tokens_deltas_came() -> None:
    # llama-server sends the finish reason in an event of its own, after the last token.
    pacer = Pacer(INTERVAL, 3)
    pacer.hold_until(text("a"), 100.0)
    assert pacer.hold_until(text("b"), 100.001) > 0.0
    assert pacer.hold_until(text("c"), 100.002) == 0.0, "the read after the last token waited"
    assert Pacer(INTERVAL, 1).hold_until(text("a", "b"), 100.0) == 0.0


def test_a_max_tokens_that_is_not_an_integer_is_no_limit() -> None:
    pacer = Pacer(INTERVAL, "3")
    pacer.hold_until(text("a"), 100.0)
    assert pacer.hold_until(text("b", "c", "d"), 100.001) > 0.0


async def test_a_fast_stream_comes_as_its_first_delta_then_one_message_per_interval(
    servers: ServerFactory, tiny_model: Path
) -> None:
    # An interval far longer than the whole stream: after the first two
    # deltas (the second shows the stream is fast), the rest waits for one read.
    config = "[limits]\nstream_interval_ms = 1000\n" + fake_model("m", tiny_model, "--token-seconds", "0.002")
    server = servers.start(config)
    async with connect(server.address) as client:
        request = inference_pb2.CompleteRequest(model="m", prompt="p", max_tokens=20)
        messages = await read_all(client.inference.Complete(request))
    deltas = [m for m in messages if m.text]
    assert [m.token_count for m in deltas] == [1, 1, 18], [m.token_count for m in deltas]
    assert messages[-1].usage.completion_tokens == 20
    assert "".join(m.text for m in deltas), "no text"


async def test_interval_zero_sends_each_delta_as_it_comes(servers: ServerFactory, tiny_model: Path) -> None:
    config = "[limits]\nstream_interval_ms = 0\n" + fake_model("m", tiny_model, "--token-seconds", "0.02")
    server = servers.start(config)
    async with connect(server.address) as client:
        request = inference_pb2.CompleteRequest(model="m", prompt="p", max_tokens=10)
        messages = await read_all(client.inference.Complete(request))
    # 20 ms apart, a delta is alone in its read (unless the machine stalls the relay that long).
    counts = [m.token_count for m in messages if m.text]
    assert sum(counts) == 10
    assert len(counts) >= 8, counts
