"""Tools in Chat (issue 19): requests checked into OpenAI's tool fields, streamed pieces into deltas. Pure.

A request's tools, tool choice, assistant messages' calls and tool
messages' answers go to the backend as OpenAI's API has them; the pieces of
tool calls a backend streams are joined per call within one message
(`join_pieces`), so a client assembles whole calls from a few deltas.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format

from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as pb
from lemonade_grpc.api.content import check_vision, content_payload
from lemonade_grpc.api.formats import integral
from lemonade_grpc.backends.chunks import ToolCallPiece
from lemonade_grpc.core.catalog import ModelSpec, Recipe
from lemonade_grpc.core.errors import CapabilityMissing, InvalidRequest

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 128
MODES = {
    pb.TOOL_CHOICE_MODE_UNSPECIFIED: "auto",
    pb.TOOL_CHOICE_MODE_AUTO: "auto",
    pb.TOOL_CHOICE_MODE_NONE: "none",
    pb.TOOL_CHOICE_MODE_REQUIRED: "required",
}


def tools_payload(request: pb.ChatRequest) -> dict[str, Any]:
    """`tools` and `tool_choice` as OpenAI's API has them (none without tools).

    Raises `InvalidRequest` naming a bad field.
    """
    if not request.tools:
        if request.HasField("tool_choice"):
            raise InvalidRequest("tool_choice needs tools", field="tool_choice")
        return {}
    if len(request.tools) > MAX_TOOLS:
        raise InvalidRequest(f"at most {MAX_TOOLS} tools, got {len(request.tools)}", field="tools")
    names: set[str] = set()
    tools = []
    for index, tool in enumerate(request.tools):
        if not TOOL_NAME.fullmatch(tool.name) or tool.name in names:
            raise InvalidRequest(
                f"tools[{index}].name must be 1 to 64 letters, digits, _ or -, unique among the tools",
                field=f"tools[{index}].name",
            )
        names.add(tool.name)
        function: dict[str, Any] = {"name": tool.name, "description": tool.description}
        function["parameters"] = (
            integral(json_format.MessageToDict(tool.parameters))
            if tool.HasField("parameters")
            else {"type": "object", "properties": {}}
        )
        tools.append({"type": "function", "function": function})
    payload: dict[str, Any] = {"tools": tools}
    choice = request.tool_choice
    kind = choice.WhichOneof("choice") if request.HasField("tool_choice") else None
    if kind == "function":
        if choice.function not in names:
            raise InvalidRequest(
                f"tool_choice.function names no tool of the request: {choice.function[:64]!r}",
                field="tool_choice.function",
            )
        payload["tool_choice"] = {"type": "function", "function": {"name": choice.function}}
    elif kind == "mode":
        if choice.mode not in MODES:
            raise InvalidRequest(f"unknown tool_choice.mode {choice.mode}", field="tool_choice.mode")
        payload["tool_choice"] = MODES[choice.mode]
    return payload


def check_capability(request: pb.ChatRequest, spec: ModelSpec) -> None:
    """Raise `CapabilityMissing` for what `spec` cannot serve: images without a projector, or tools.

    Tools sent to a llama-server model whose chat template takes none were,
    measured, answered in prose as if there were no tools. A `command`
    backend's support is unknown: its requests pass.
    """
    check_vision(request, spec)
    if request.tools and spec.recipe is Recipe.LLAMACPP and not spec.capabilities.tools:
        raise CapabilityMissing(
            spec.name,
            "tools",
            f"the chat template of {spec.name} takes no tools (its GGUF's tokenizer.chat_template never"
            " reads them): use a model made for tool calls, or a JSON-schema answer (response_format)",
        )


def message_payload(message: pb.ChatMessage, index: int) -> dict[str, Any]:
    """One message as OpenAI's API has it, with its tool calls or the call it answers."""
    at = f"messages[{index}]"
    payload: dict[str, Any] = {"role": message.role, "content": content_payload(message, at)}
    if message.tool_calls:
        if message.role != "assistant":
            raise InvalidRequest(
                f"messages[{index}]: only an assistant message has tool_calls",
                field=f"messages[{index}].tool_calls",
            )
        payload["tool_calls"] = [
            _call(call, f"messages[{index}].tool_calls[{n}]") for n, call in enumerate(message.tool_calls)
        ]
    if message.role == "tool":
        if not message.tool_call_id:
            raise InvalidRequest(
                f"{at}: a tool message needs the tool_call_id of the call it answers",
                field=f"{at}.tool_call_id",
            )
        payload["tool_call_id"] = message.tool_call_id
    elif message.tool_call_id:
        raise InvalidRequest(
            f"messages[{index}]: only a tool message has a tool_call_id",
            field=f"messages[{index}].tool_call_id",
        )
    return payload


def _call(call: pb.ToolCall, field: str) -> dict[str, Any]:
    if not call.id or not TOOL_NAME.fullmatch(call.name):
        raise InvalidRequest(f"{field} needs an id and a tool's name", field=field)
    try:
        arguments = json.loads(call.arguments or "{}")
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"{field}.arguments must be a JSON object", field=f"{field}.arguments")
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments or "{}"},
    }


def join_pieces(pieces: Iterable[ToolCallPiece]) -> list[pb.ToolCallDelta]:
    """The pieces of one message, a delta per call (in the order the calls first appear)."""
    joined: dict[int, pb.ToolCallDelta] = {}
    for piece in pieces:
        delta = joined.get(piece.index)
        if delta is None:
            joined[piece.index] = pb.ToolCallDelta(
                index=piece.index, id=piece.id, name=piece.name, arguments=piece.arguments
            )
            continue
        delta.id = delta.id or piece.id
        delta.name = delta.name or piece.name
        delta.arguments += piece.arguments
    return list(joined.values())
