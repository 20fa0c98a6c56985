"""Images in Chat (issue 19): content parts sent as OpenAI's API has them, to models that can see them.

No vision model fits this project's machines (a projector is hundreds of
MB), so what reaches a backend is read from a fake one's request log;
a llama-server model without a projector refuses images before it loads.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import grpc
import pytest

from conftest import ServerFactory, connect, fake_model
from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as ipb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.backends.recipes import backend_argv
from lemonade_grpc.client import error_details
from lemonade_grpc.config import ConfigError, Overrides, load

PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/PchI7wAAAABJRU5ErkJggg=="
)


def looking(content: str, *parts: ipb.ContentPart, model: str = "eyes") -> ipb.ChatRequest:
    request = ipb.ChatRequest(model=model, max_tokens=2)
    request.messages.add(role="user", content=content, parts=parts)
    return request


async def test_text_and_images_reach_the_backend_as_content_parts(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    log = tmp_path / "requests.jsonl"
    server = servers.start(fake_model("eyes", tiny_model, "--request-log", str(log)))
    image = ipb.ContentPart(image=ipb.Image(data=PIXEL, mime_type="image/png"))
    async with connect(server.address) as client:
        await client.ready("eyes")
        [
            r
            async for r in client.inference.Chat(
                looking("What is this?", image, ipb.ContentPart(text="Be brief."))
            )
        ]
        [r async for r in client.inference.Chat(looking("No parts: plain text."))]
    with_parts, plain = (json.loads(line)["messages"][0]["content"] for line in log.read_text().splitlines())
    assert with_parts == [
        {"type": "text", "text": "What is this?"},
        {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(PIXEL).decode()},
        },
        {"type": "text", "text": "Be brief."},
    ]
    assert plain == "No parts: plain text."


async def test_images_for_a_model_without_a_projector_are_refused_before_it_loads(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    server = servers.start()
    image = ipb.ContentPart(image=ipb.Image(data=PIXEL, mime_type="image/png"))
    async with connect(server.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            [r async for r in client.inference.Chat(looking("What is this?", image, model="smollm2"))]
        details = error_details(refused.value)
        assert (details.code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CAPABILITY_MISSING")
        assert details.metadata == {"model": "smollm2", "capability": "vision"}
        assert list((await client.control.Status(pb.StatusRequest())).pool.models) == []


@pytest.mark.parametrize(
    ("part", "field"),
    [
        (
            ipb.ContentPart(image=ipb.Image(data=PIXEL, mime_type="image/svg+xml")),
            "messages[0].parts[0].image.mime_type",
        ),
        (ipb.ContentPart(image=ipb.Image(mime_type="image/png")), "messages[0].parts[0].image.data"),
        (ipb.ContentPart(), "messages[0].parts[0]"),
    ],
    ids=["svg", "no-bytes", "empty-part"],
)
async def test_a_malformed_part_is_refused_naming_it(
    servers: ServerFactory, tiny_model: Path, part: ipb.ContentPart, field: str
) -> None:
    server = servers.start(fake_model("eyes", tiny_model))
    async with connect(server.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            [r async for r in client.inference.Chat(looking("x", part))]
    assert error_details(refused.value).bad_fields == (field,)


def test_a_projector_in_the_catalog_is_passed_to_llama_server_and_makes_the_model_see(
    tmp_path: Path, tiny_model: Path
) -> None:
    (tmp_path / "proj.gguf").write_bytes(b"GGUF")
    config = tmp_path / "c.toml"
    config.write_text(f'[models.v]\npath = "{tiny_model}"\nmmproj = "proj.gguf"\n')
    spec = load(Overrides(config=config), env={}).models["v"]
    assert spec.mmproj == tmp_path / "proj.gguf"
    argv = backend_argv(spec, spec.defaults, 8080)
    assert argv[argv.index("--mmproj") + 1] == str(tmp_path / "proj.gguf")
    for entry, problem in (
        ('path = "m"\nmmproj = "missing.gguf"', "is not a file"),
        ('recipe = "command"\npath = "m"\ncommand = ["{port}"]\nmmproj = "proj.gguf"', "llamacpp"),
    ):
        (tmp_path / "m").write_bytes(b"")
        config.write_text(f"[models.v]\n{entry}\n")
        with pytest.raises(ConfigError, match=problem) as refused:
            load(Overrides(config=config), env={})
        assert refused.value.field == "models.v.mmproj"
