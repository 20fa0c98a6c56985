"""`response_format`: a request's output constraint as llama-server takes it, per request. Pure.

llama-server reads OpenAI's `response_format` on /v1/chat/completions, but
ignores it on /v1/completions, which takes `json_schema` (and both take
`grammar`): measured on this build, a JSON-schema Complete sent as
`response_format` came back as prose.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as pb
from lemonade_grpc.core.errors import InvalidRequest

GRAMMAR_BYTES = 64 << 10
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def format_payload(request: pb.CompleteRequest | pb.ChatRequest) -> dict[str, Any]:
    """The body fields that constrain `request`'s output (none without `response_format`).

    Raises `InvalidRequest` naming the field for a missing schema or an
    empty or oversized grammar. Whether a schema or grammar makes sense is
    the backend's to say (BACKEND_REJECTED, with its message).
    """
    if not request.HasField("response_format"):
        return {}
    chat = isinstance(request, pb.ChatRequest)
    constraint = request.response_format
    kind = constraint.WhichOneof("format")
    if kind == "grammar":
        if not constraint.grammar or len(constraint.grammar.encode()) > GRAMMAR_BYTES:
            raise InvalidRequest(
                f"grammar must be 1 to {GRAMMAR_BYTES:,} bytes of GBNF", field="response_format.grammar"
            )
        return {"grammar": constraint.grammar}
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}} if chat else {"json_schema": ANY_OBJECT}
    if kind == "json_schema":
        if not constraint.json_schema.HasField("schema"):
            raise InvalidRequest(
                "json_schema.schema is required (a JSON Schema object)",
                field="response_format.json_schema.schema",
            )
        schema = integral(json_format.MessageToDict(constraint.json_schema.schema))
        if not chat:
            return {"json_schema": schema}
        described: dict[str, Any] = {"name": constraint.json_schema.name or "response", "schema": schema}
        return {"response_format": {"type": "json_schema", "json_schema": described}}
    raise InvalidRequest(
        "response_format must set one of json_object, json_schema, grammar", field="response_format"
    )


def integral(value: Any) -> Any:
    """`value` with every float that has no fraction made an int (a Struct's numbers are all doubles).

    llama-server refused `"minItems": 2.0` ("must be a non-negative integer").
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: integral(item) for key, item in value.items()}
    if isinstance(value, list):
        return [integral(item) for item in value]
    return value
