"""A tool-using agent on lemonade-grpc's default model (`make run`): tool call, tool result, answer.

Offers the model a `get_weather` tool. A model whose chat template takes
tools calls it (streamed tool-call deltas, assembled); SmolLM2's takes
none, so the server refuses the tools (CAPABILITY_MISSING) and the agent
asks instead for a JSON answer that must follow a schema naming the tool
and its arguments. Either way it runs the tool and hands the result back
for the final answer.

    .venv/bin/python examples/python/agent.py ["question"] [--address HOST:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import grpc

from lemonade_grpc.client import Client, connect, error_details

WEATHER = {"lisbon": "22 °C and sunny", "paris": "14 °C and cloudy", "london": "11 °C and raining"}
TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Lisbon", "Paris", "London"]}},
        "required": ["city"],
    },
}
# The fallback: the tool call as a JSON answer the grammar forces.
CALL_SCHEMA = {
    "type": "object",
    "properties": {"tool": {"enum": ["get_weather"]}, "arguments": TOOL["parameters"]},
    "required": ["tool", "arguments"],
    "additionalProperties": False,
}


def get_weather(city: str) -> str:
    return WEATHER.get(city.lower(), "unknown")


async def call_tool(client: Client, question: str) -> tuple[str, dict[str, Any], str]:
    """How the model chose the tool ("tools" or "json-schema"), its arguments, and the call's id."""
    try:
        replies = client.chat("smollm2", [("user", question)], tools=[TOOL], tool_choice="required")
        deltas = [delta async for reply in replies for delta in reply.tool_calls]
        return "tools", json.loads("".join(d.arguments for d in deltas)), deltas[0].id
    except grpc.aio.AioRpcError as error:
        if error_details(error).reason != "CAPABILITY_MISSING":
            raise
    prompt = [("system", "Choose the tool call that answers the user, as JSON."), ("user", question)]
    schema = {"json_schema": {"schema": CALL_SCHEMA}}
    replies = client.chat("smollm2", prompt, response_format=schema, temperature=0, max_tokens=64)
    text = "".join([reply.text async for reply in replies])
    return "json-schema", json.loads(text)["arguments"], ""  # no call id: the model made no call


async def run(address: str, question: str) -> list[str]:
    lines = [f"question: {question}"]
    async with connect(address) as client:
        how, arguments, call_id = await call_tool(client, question)
        result = get_weather(**arguments)
        lines += [f"tool call ({how}): get_weather({json.dumps(arguments)})", f"tool result: {result}"]
        messages: list[tuple[str, str] | dict[str, Any]]
        if call_id:  # the model called the tool: its call, then the tool's answer to it
            call = {"id": call_id, "name": TOOL["name"], "arguments": json.dumps(arguments)}
            messages = [
                ("user", question),
                {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call_id, "content": result},
            ]
        else:  # a model without tools: the result given with the question
            fact = f"Tool result: the weather in {arguments['city']} is {result}."
            messages = [("system", "You are a helpful assistant."), ("user", f"{fact} Question: {question}")]
        replies = client.chat("smollm2", messages, temperature=0, max_tokens=48)
        answer = "".join([reply.text async for reply in replies])
    lines.append(f"answer: {' '.join(answer.split())}")  # one line, whatever the model wrote
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="What is the weather like in Lisbon?")
    parser.add_argument("--address", default="127.0.0.1:50051")
    args = parser.parse_args()
    print("\n".join(asyncio.run(run(args.address, args.question))))


if __name__ == "__main__":
    main()
