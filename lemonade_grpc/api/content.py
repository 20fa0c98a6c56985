"""A chat message's content in parts, text and images (issue 19), as OpenAI's API has it. Pure.

An image goes inline as a data URL, which llama-server decodes with the
model's projector (`--mmproj`); a model without one cannot see it, and a
request with images for it is refused before it loads.
"""

from __future__ import annotations

import base64
from typing import Any

from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as pb
from lemonade_grpc.core.catalog import ModelSpec, Recipe
from lemonade_grpc.core.errors import CapabilityMissing, InvalidRequest

IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp"})


def content_payload(message: pb.ChatMessage, at: str) -> str | list[dict[str, Any]]:
    """`message`'s content: its text alone, or its text then its parts. `at` names the message."""
    if not message.parts:
        return message.content
    parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
    for index, part in enumerate(message.parts):
        field = f"{at}.parts[{index}]"
        kind = part.WhichOneof("part")
        if kind == "text":
            parts.append({"type": "text", "text": part.text})
        elif kind == "image":
            if not part.image.data:
                raise InvalidRequest(f"{field}: an image needs its bytes", field=f"{field}.image.data")
            if part.image.mime_type not in IMAGE_TYPES:
                raise InvalidRequest(
                    f"{field}: mime_type must be one of {', '.join(sorted(IMAGE_TYPES))}",
                    field=f"{field}.image.mime_type",
                )
            url = f"data:{part.image.mime_type};base64,{base64.b64encode(part.image.data).decode()}"
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise InvalidRequest(f"{field} is empty: set text or image", field=field)
    return parts


def check_vision(request: pb.ChatRequest, spec: ModelSpec) -> None:
    """Raise `CapabilityMissing` for images sent to a llama-server model without a projector."""
    images = any(part.HasField("image") for message in request.messages for part in message.parts)
    if images and spec.recipe is Recipe.LLAMACPP and not spec.capabilities.vision:
        raise CapabilityMissing(
            spec.name,
            "vision",
            f"{spec.name} has no projector to see images (the catalog's `mmproj`): use a vision model",
        )
