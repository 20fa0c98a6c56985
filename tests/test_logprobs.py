"""Log-probabilities with their top alternatives (issue 19), on SmolLM2 and on what a backend may send."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest

from conftest import ServerFactory, connect
from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as ipb
from lemonade_grpc.backends.chunks import MalformedEvent, parse_chunk
from lemonade_grpc.client import error_details


def check(replies: list[ipb.CompleteResponse] | list[ipb.ChatResponse], alternatives: int) -> None:
    """Every token with its logprob and `alternatives` alternatives, likeliest first; greedy picks the top."""
    assert sum(r.token_count for r in replies) > 0
    for reply in replies:
        assert len(reply.logprobs) == reply.token_count  # none on the last message (finish, usage)
        # The tokens' bytes are the text's (a character split over two tokens included).
        assert b"".join(t.token.bytes for t in reply.logprobs).decode() == reply.text
        for token in reply.logprobs:
            assert len(token.top) == alternatives
            assert [a.logprob for a in token.top] == sorted((a.logprob for a in token.top), reverse=True)
            assert token.token.logprob <= 0
            # Greedy (temperature 0): the token chosen is the likeliest.
            assert token.token.id == token.top[0].id
            assert token.token.logprob == pytest.approx(token.top[0].logprob)


async def test_each_token_comes_with_its_logprob_and_the_likeliest_alternatives(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    server = servers.start()
    prompt = "The capital of France is"
    async with connect(server.address) as client:
        complete = ipb.CompleteRequest(
            model="smollm2", prompt=prompt, max_tokens=6, logprobs=3, temperature=0
        )
        chat = ipb.ChatRequest(model="smollm2", max_tokens=6, logprobs=2, temperature=0)
        chat.messages.add(role="user", content="Say hello.")
        completed = [r async for r in client.inference.Complete(complete)]
        chatted = [r async for r in client.inference.Chat(chat)]
        plain = ipb.CompleteRequest(model="smollm2", prompt=prompt, max_tokens=6)
        without = [r async for r in client.inference.Complete(plain)]
    check(completed, 3)
    check(chatted, 2)
    assert all(not r.logprobs for r in without)


async def test_logprobs_beyond_twenty_alternatives_are_refused_naming_the_field(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    server = servers.start()
    async with connect(server.address) as client:
        request = ipb.CompleteRequest(model="smollm2", prompt="x", logprobs=21)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            [r async for r in client.inference.Complete(request)]
    details = error_details(refused.value)
    assert (details.code, details.bad_fields) == (grpc.StatusCode.INVALID_ARGUMENT, ("logprobs",))


def token(**fields: object) -> dict[str, object]:
    return {"id": 7, "token": "a", "bytes": [97], "logprob": -0.5} | fields


def test_a_zero_probability_comes_as_minus_infinity_and_a_malformed_entry_is_the_backends_fault() -> None:
    event = {"choices": [{"text": "a", "logprobs": {"content": [token(top_logprobs=[token(logprob=None)])]}}]}
    [parsed] = parse_chunk(event).logprobs or []
    assert parsed.token.logprob == -0.5
    assert parsed.top[0].logprob == -math.inf  # llama-server writes -inf as null
    for bad in (
        token(logprob=0.5),
        token(id=-1),
        token(bytes=[256]),
        token(token=None),
        token(top_logprobs={}),
        "a",
    ):
        with pytest.raises(MalformedEvent):
            parse_chunk({"choices": [{"text": "a", "logprobs": {"content": [bad]}}]})
    assert (
        parse_chunk({"choices": [{"text": "", "logprobs": None, "finish_reason": "length"}]}).logprobs is None
    )
