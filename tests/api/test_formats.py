"""`response_format` (issue 19): JSON objects, JSON schemas and grammars, per request, on SmolLM2.

A JSON-schema answer must parse and validate against its schema (several
schemas, several seeds); a grammar's answer must be in its language; and
one request's constraint must not touch the next request or the process
(a client reloading with `--json-schema` changed every user's output).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
from google.protobuf import struct_pb2

from conftest import Client, ServerFactory, connect
from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as ipb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.api.formats import integral
from lemonade_grpc.client import error_details

SCHEMAS: dict[str, dict[str, Any]] = {
    "weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "temperature_c": {"type": "integer", "minimum": -50, "maximum": 60},
        },
        "required": ["city", "temperature_c"],
        "additionalProperties": False,
    },
    "list": {
        "type": "array",
        "items": {"type": "string", "enum": ["red", "green", "blue"]},
        "minItems": 2,
        "maxItems": 3,
    },
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "adult": {"type": "boolean"},
            "pets": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 2},
        },
        "required": ["name", "adult", "pets"],
        "additionalProperties": False,
    },
}
PROMPTS = {
    "weather": "What is the weather in Lisbon? Answer in JSON.",
    "list": "Name some colours, as a JSON list.",
    "person": "Describe a person as JSON.",
}


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def schema_format(schema: dict[str, Any], name: str = "") -> ipb.ResponseFormat:
    struct = struct_pb2.Struct()
    struct.update(schema)
    return ipb.ResponseFormat(json_schema=ipb.JsonSchemaFormat(schema=struct, name=name))


async def chat(client: Client, content: str, **fields: Any) -> tuple[str, int]:
    request = ipb.ChatRequest(model="smollm2", **({"max_tokens": 200} | fields))
    request.messages.add(role="user", content=content)
    replies = [r async for r in client.inference.Chat(request)]
    return "".join(r.text for r in replies), replies[-1].finish_reason


@pytest.mark.parametrize("name", sorted(SCHEMAS))
async def test_a_json_schema_chat_answer_validates_against_its_schema_whatever_the_seed(
    servers: ServerFactory, smollm2_model: Path, name: str
) -> None:
    server = servers.start()
    async with connect(server.address) as client:
        for seed in (1, 2):
            text, finish = await chat(
                client, PROMPTS[name], seed=seed, response_format=schema_format(SCHEMAS[name], name)
            )
            assert finish == ipb.FINISH_REASON_STOP, (seed, text)
            jsonschema.validate(json.loads(text), SCHEMAS[name])


async def test_complete_follows_a_json_schema_and_a_grammar_too(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    server = servers.start()
    async with connect(server.address) as client:
        for seed in (1, 2):
            request = ipb.CompleteRequest(
                model="smollm2",
                prompt="The weather in Lisbon, as JSON:",
                max_tokens=200,
                seed=seed,
                response_format=schema_format(SCHEMAS["weather"]),
            )
            replies = [r async for r in client.inference.Complete(request)]
            assert replies[-1].finish_reason == ipb.FINISH_REASON_STOP
            jsonschema.validate(json.loads("".join(r.text for r in replies)), SCHEMAS["weather"])
        yes_no = ipb.ResponseFormat(grammar='root ::= "yes" | "no"')
        for seed in (1, 2, 3):
            request = ipb.CompleteRequest(
                model="smollm2", prompt="Is the sky blue?", max_tokens=8, seed=seed, response_format=yes_no
            )
            assert "".join([r.text async for r in client.inference.Complete(request)]) in ("yes", "no")


async def test_a_json_object_or_grammar_chat_answer_is_in_its_language(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    server = servers.start()
    async with connect(server.address) as client:
        text, finish = await chat(
            client,
            'Reply with {"ok": true}',
            seed=1,
            response_format=ipb.ResponseFormat(json_object=ipb.JsonObjectFormat()),
        )
        assert text.lstrip().startswith("{"), text
        if finish == ipb.FINISH_REASON_STOP:
            assert isinstance(json.loads(text), dict)
        grammar = 'root ::= ("Paris" | "Lyon" | "Nice") "."'
        text, finish = await chat(
            client, "Name a city in France.", seed=4, response_format=ipb.ResponseFormat(grammar=grammar)
        )
        assert finish == ipb.FINISH_REASON_STOP
        assert text in ("Paris.", "Lyon.", "Nice.")


async def test_a_constraint_holds_for_its_own_request_only(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    server = servers.start()
    async with connect(server.address) as client:
        question = "What is the capital of France?"
        before, _ = await chat(client, question, seed=7, temperature=0, max_tokens=16)
        assert not before.lstrip().startswith("{")  # prose, unconstrained
        pid = (await client.pids())["smollm2"]
        constrained, _ = await chat(
            client,
            question,
            seed=7,
            temperature=0,
            max_tokens=64,
            response_format=schema_format(SCHEMAS["weather"]),
        )
        jsonschema.validate(json.loads(constrained), SCHEMAS["weather"])
        after, _ = await chat(client, question, seed=7, temperature=0, max_tokens=16)
        # Prose again: the grammar went with its request. (Not compared word for word with
        # `before`: greedy answers may differ with llama-server's prompt cache.)
        assert not after.lstrip().startswith("{")
        with pytest.raises(json.JSONDecodeError):
            json.loads(after)
        assert (await client.pids())["smollm2"] == pid  # the same process: nothing was reloaded


@pytest.mark.parametrize(
    ("response_format", "code", "reason", "field"),
    [
        (
            ipb.ResponseFormat(json_schema=ipb.JsonSchemaFormat(name="x")),
            INVALID,
            "INVALID_REQUEST",
            "response_format.json_schema.schema",
        ),
        (
            ipb.ResponseFormat(grammar=""),
            INVALID,
            "INVALID_REQUEST",
            "response_format.grammar",
        ),
        (ipb.ResponseFormat(), INVALID, "INVALID_REQUEST", "response_format"),
        (
            ipb.ResponseFormat(grammar="x" * ((64 << 10) + 1)),
            INVALID,
            "INVALID_REQUEST",
            "response_format.grammar",
        ),
        (
            ipb.ResponseFormat(grammar="root ::= bad bad"),
            INVALID,
            "BACKEND_REJECTED",
            None,
        ),
        (schema_format({"type": "objekt"}), INVALID, "BACKEND_REJECTED", None),
    ],
    ids=["schema-missing", "empty-grammar", "nothing-set", "grammar-too-big", "bad-grammar", "bad-schema"],
)
async def test_a_bad_constraint_is_refused_and_the_model_keeps_serving(
    servers: ServerFactory,
    smollm2_model: Path,
    response_format: ipb.ResponseFormat,
    code: grpc.StatusCode,
    reason: str,
    field: str | None,
) -> None:
    server = servers.start()
    async with connect(server.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await chat(client, "hi", response_format=response_format)
        details = error_details(refused.value)
        assert (details.code, details.reason) == (code, reason)
        if field is not None:
            assert details.bad_fields == (field,)
            status = await client.control.Status(pb.StatusRequest())
            assert list(status.pool.models) == []  # refused before anything loads
        else:
            assert (await chat(client, "Say hi.", max_tokens=4))[0]  # the backend refused; it still serves


def test_a_structs_whole_numbers_go_to_the_backend_as_integers() -> None:
    # What MessageToDict makes of a Struct: every number a float.
    assert integral(
        {"minItems": 2.0, "nested": [{"maximum": 3.5, "minimum": -1.0}], "flag": True, "text": "2"}
    ) == {
        "minItems": 2,
        "nested": [{"maximum": 3.5, "minimum": -1}],
        "flag": True,
        "text": "2",
    }
    assert type(integral(2.0)) is int
    assert integral(True) is True
