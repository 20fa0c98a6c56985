"""Tools and reasoning in Chat (issue 19), through a backend scripted to send what llama-server sends.

The real small model cannot be made to call a tool (this llama-server with
SmolLM2 answers in prose even with `tool_choice: "required"`), so the
stream is scripted: the SSE events llama-server writes for a thinking
model that calls two tools, delivered a few bytes at a time (split inside
JSON strings and UTF-8 characters). What a client assembles from the
deltas must be exactly the calls; what reaches the backend must be
OpenAI's tool fields; a malformed request is refused naming its field.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import Client, ServerFactory, connect, fake_model
from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as ipb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.api.tools import join_pieces
from lemonade_grpc.backends.sse import SSEDecoder
from lemonade_grpc.client import error_details

REASONING = "The user wants the weather in São Paulo and Zürich; I call get_weather twice."
CALLS = [
    ("call_0", "get_weather", '{"city": "São Paulo", "unit": "celsius"}'),
    ("call_1", "get_weather", '{"city": "Zürich", "unit": "celsius"}'),
]


def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    chunk = {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "created": 1796667530,
        "id": "chatcmpl-x",
        "model": "m",
        "object": "chat.completion.chunk",
        **extra,
    }
    return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"


def tool_call_stream() -> bytes:
    """What llama-server streams for REASONING, then CALLS (arguments a few characters an event)."""
    parts = [event({"role": "assistant", "content": None})]
    parts += [event({"reasoning_content": REASONING[i : i + 5]}) for i in range(0, len(REASONING), 5)]
    for index, (call_id, name, arguments) in enumerate(CALLS):
        first = {
            "index": index,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        parts.append(event({"tool_calls": [first]}))
        for i in range(0, len(arguments), 3):
            piece = {"index": index, "function": {"arguments": arguments[i : i + 3]}}
            parts.append(event({"tool_calls": [piece]}))
    parts.append(event({}, "tool_calls", timings={"prompt_ms": 5.0, "predicted_per_second": 50.0}))
    usage = {"completion_tokens": 60, "prompt_tokens": 30, "total_tokens": 90}
    parts.append(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
    return b"".join(parts) + b"data: [DONE]\n\n"


def assemble(deltas: list[ipb.ToolCallDelta]) -> list[tuple[str, str, str]]:
    """Whole calls from their deltas, as a client joins them (by index)."""
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        call = calls.setdefault(delta.index, ["", "", ""])
        call[0] = call[0] or delta.id
        call[1] = call[1] or delta.name
        call[2] += delta.arguments
    return [(i, n, a) for i, n, a in (calls[k] for k in sorted(calls))]


def weather_tool() -> ipb.Tool:
    parameters = struct_pb2.Struct()
    parameters.update(
        {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "maxProperties": 2,
        }
    )
    return ipb.Tool(name="get_weather", description="The weather in a city", parameters=parameters)


def scripted(tmp_path: Path, tiny_model: Path, split: int) -> str:
    script = tmp_path / "stream.sse"
    script.write_bytes(tool_call_stream())
    return fake_model(
        "m",
        tiny_model,
        "--script",
        str(script),
        "--split-bytes",
        str(split),
        "--request-log",
        str(tmp_path / "requests.jsonl"),
    )


async def chat(client: Client, request: ipb.ChatRequest) -> list[ipb.ChatResponse]:
    return [r async for r in client.inference.Chat(request)]


@pytest.mark.parametrize("split", [0, 1, 7])
async def test_streamed_tool_calls_and_reasoning_arrive_whole_and_apart_from_the_answer(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path, split: int
) -> None:
    server = servers.start(scripted(tmp_path, tiny_model, split))
    request = ipb.ChatRequest(model="m", tools=[weather_tool()])
    request.messages.add(role="user", content="Weather in São Paulo and Zürich?")
    async with connect(server.address) as client:
        replies = await chat(client, request)
    deltas = [d for r in replies for d in r.tool_calls]
    assert assemble(deltas) == CALLS
    assert "".join(r.reasoning for r in replies) == REASONING
    assert "".join(r.text for r in replies) == ""
    last = replies[-1]
    assert last.finish_reason == ipb.FINISH_REASON_TOOL_CALLS
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (30, 60)
    # Joined within a message: never more messages than the backend sent deltas.
    assert len([r for r in replies if r.tool_calls]) <= sum(1 for d in deltas)


async def test_tools_tool_choice_and_a_tool_answer_reach_the_backend_as_openai_has_them(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    server = servers.start(scripted(tmp_path, tiny_model, 0))
    request = ipb.ChatRequest(
        model="m", tools=[weather_tool()], tool_choice=ipb.ToolChoice(function="get_weather")
    )
    request.messages.add(role="user", content="Weather in Zürich?")
    request.messages.add(
        role="assistant",
        tool_calls=[ipb.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Zürich"}')],
    )
    request.messages.add(role="tool", tool_call_id="call_1", content='{"temperature_c": 4}')
    async with connect(server.address) as client:
        await chat(client, request)
        request.tool_choice.mode = ipb.TOOL_CHOICE_MODE_REQUIRED
        await chat(client, request)
    first, second = (json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines())
    assert first["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                    "maxProperties": 2,  # an integer, as a schema wants it (a Struct holds doubles)
                },
            },
        }
    ]
    assert first["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert second["tool_choice"] == "required"
    assert first["messages"] == [
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
                }
            ],
        },
        {"role": "tool", "content": '{"temperature_c": 4}', "tool_call_id": "call_1"},
    ]


def bad(**fields: Any) -> ipb.ChatRequest:
    request = ipb.ChatRequest(model="m", **fields)
    if not request.messages:
        request.messages.add(role="user", content="hi")
    return request


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (bad(tool_choice=ipb.ToolChoice(mode=ipb.TOOL_CHOICE_MODE_REQUIRED)), "tool_choice"),
        (bad(tools=[ipb.Tool(name="bad name")]), "tools[0].name"),
        (bad(tools=[ipb.Tool(name="f"), ipb.Tool(name="f")]), "tools[1].name"),
        (bad(tools=[ipb.Tool(name="f")], tool_choice=ipb.ToolChoice(function="g")), "tool_choice.function"),
        (bad(tools=[ipb.Tool(name="f")] * 129), "tools"),
        (bad(messages=[ipb.ChatMessage(role="tool", content="4")]), "messages[0].tool_call_id"),
        (bad(messages=[ipb.ChatMessage(role="user", tool_call_id="c")]), "messages[0].tool_call_id"),
        (
            bad(messages=[ipb.ChatMessage(role="user", tool_calls=[ipb.ToolCall(id="c", name="f")])]),
            "messages[0].tool_calls",
        ),
        (
            bad(messages=[ipb.ChatMessage(role="assistant", tool_calls=[ipb.ToolCall(name="f")])]),
            "messages[0].tool_calls[0]",
        ),
        (
            bad(
                messages=[
                    ipb.ChatMessage(
                        role="assistant", tool_calls=[ipb.ToolCall(id="c", name="f", arguments="[1]")]
                    )
                ]
            ),
            "messages[0].tool_calls[0].arguments",
        ),
    ],
    ids=[
        "choice-without-tools",
        "bad-name",
        "same-name",
        "unknown-function",
        "too-many",
        "tool-without-call-id",
        "call-id-on-user",
        "calls-on-user",
        "call-without-id",
        "arguments-not-an-object",
    ],
)
async def test_a_malformed_tool_request_is_refused_naming_its_field_before_anything_loads(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path, request_: ipb.ChatRequest, field: str
) -> None:
    server = servers.start(scripted(tmp_path, tiny_model, 0))
    async with connect(server.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await chat(client, request_)
        details = error_details(refused.value)
        assert (details.code, details.reason, details.bad_fields) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REQUEST",
            (field,),
        )
        assert list((await client.control.Status(pb.StatusRequest())).pool.models) == []
    assert not (tmp_path / "requests.jsonl").exists()


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(0, len(tool_call_stream())), max_size=40), per_message=st.integers(1, 8))
def test_calls_assemble_the_same_wherever_the_stream_is_cut_and_however_events_are_batched(
    cuts: list[int], per_message: int
) -> None:
    """The decoder and the per-message joining, fed the stream in pieces cut anywhere."""
    stream = tool_call_stream()
    bounds = sorted({0, len(stream), *cuts})
    decoder = SSEDecoder()
    chunks = [c for start, end in itertools.pairwise(bounds) for c in decoder.feed(stream[start:end])]
    assert decoder.done
    deltas: list[ipb.ToolCallDelta] = []
    for start in range(0, len(chunks), per_message):  # the chunks one message carries
        batch = chunks[start : start + per_message]
        deltas += join_pieces(piece for chunk in batch for piece in chunk.tool_calls or ())
    assert assemble(deltas) == CALLS
    assert "".join(c.reasoning for c in chunks) == REASONING
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["tool_calls"]
