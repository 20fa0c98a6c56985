"""Capabilities (issue 19): what each model can serve, from its GGUF and its catalog entry.

ListModels and Status show them; a request the model cannot serve is
refused FAILED_PRECONDITION CAPABILITY_MISSING, naming the capability,
before anything loads.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from conftest import ServerFactory, connect
from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as ipb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.client import error_details
from lemonade_grpc.core import capabilities
from lemonade_grpc.core.catalog import Capabilities, ModelSpec, ModelType, Recipe
from lemonade_grpc.core.options import EffectiveOptions


async def test_list_models_and_status_say_what_each_built_in_model_can_serve(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    server = servers.start()
    async with connect(server.address) as client:
        catalog = {
            m.name: m.capabilities for m in (await client.control.ListModels(pb.ListModelsRequest())).models
        }
        await client.ready("smollm2-embed")
        [status] = (await client.control.Status(pb.StatusRequest())).pool.models
    chat, embed = catalog["smollm2"], catalog["smollm2-embed"]
    # SmolLM2's GGUF: a chat template without tools, trained for 8,192 tokens, 576 numbers a vector.
    assert (chat.chat_template, chat.tools, chat.embedding, chat.context_length) == (True, False, False, 8192)
    assert (embed.embedding, embed.embedding_dimension, embed.rerank) == (True, 576, False)
    assert status.capabilities == embed


async def test_tools_for_a_model_whose_template_takes_none_are_refused_before_it_loads(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    """Measured: llama-server with SmolLM2 answered such a request in prose, as if there were no tools."""
    server = servers.start()
    request = ipb.ChatRequest(model="smollm2", tools=[ipb.Tool(name="get_weather")])
    request.messages.add(role="user", content="Weather in Lisbon?")
    async with connect(server.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            [r async for r in client.inference.Chat(request)]
        details = error_details(refused.value)
        assert (details.code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CAPABILITY_MISSING")
        assert details.metadata == {"model": "smollm2", "capability": "tools"}
        assert list((await client.control.Status(pb.StatusRequest())).pool.models) == []
        # Without the tools the same request is served.
        del request.tools[:]
        request.max_tokens = 4
        assert [r async for r in client.inference.Chat(request)][-1].usage.completion_tokens == 4


def spec(
    recipe: Recipe = Recipe.LLAMACPP, type_: ModelType = ModelType.LLM, pooling: str | None = None
) -> ModelSpec:
    return ModelSpec(
        name="m",
        recipe=recipe,
        path=Path("m.gguf"),
        type=type_,
        defaults=EffectiveOptions(ctx_size=512, idle_unload_seconds=None, backend_args=()),
        pooling=pooling,
    )


TOOL_TEMPLATE = "{% if tools %}{% for tool in tools %}{{ tool | tojson }}{% endfor %}{% endif %}"


@pytest.mark.parametrize(
    ("model", "metadata", "expected"),
    [
        (
            spec(),
            {
                "general.architecture": "qwen2",
                "tokenizer.chat_template": TOOL_TEMPLATE,
                "qwen2.context_length": 32768,
            },
            Capabilities(chat_template=True, tools=True, context_length=32768),
        ),
        (spec(), {}, Capabilities()),  # a header that could not be read: nothing known
        (
            spec(type_=ModelType.EMBEDDING),
            {"general.architecture": "bert", "bert.embedding_length": 768, "bert.pooling_type": 4},
            Capabilities(embedding=True, embedding_dimension=768, rerank=True),
        ),
        (
            spec(
                type_=ModelType.EMBEDDING, pooling="mean"
            ),  # the catalog's pooling wins over the GGUF's rank
            {"general.architecture": "bert", "bert.embedding_length": 768, "bert.pooling_type": 4},
            Capabilities(embedding=True, embedding_dimension=768),
        ),
        (
            spec(type_=ModelType.EMBEDDING),
            {"general.architecture": "llama", "llama.embedding_length": -1, "llama.context_length": "8k"},
            Capabilities(embedding=True),  # numbers that are not counts are unknown, not wrong
        ),
        (
            spec(Recipe.COMMAND, ModelType.EMBEDDING),
            {"tokenizer.chat_template": TOOL_TEMPLATE},
            Capabilities(embedding=True),  # a command backend: only what the catalog says
        ),
    ],
    ids=["chat-with-tools", "unknown", "reranker", "pooling-from-catalog", "bad-numbers", "command"],
)
def test_capabilities_follow_the_gguf_and_the_catalog(
    model: ModelSpec, metadata: dict[str, object], expected: Capabilities
) -> None:
    assert capabilities.of(model, metadata) == expected


def test_reading_a_file_that_is_no_gguf_gives_no_capabilities(tmp_path: Path) -> None:
    broken = tmp_path / "m.gguf"
    broken.write_bytes(b"not a gguf")
    model = ModelSpec(
        name="m",
        recipe=Recipe.LLAMACPP,
        path=broken,
        type=ModelType.EMBEDDING,
        defaults=EffectiveOptions(ctx_size=512, idle_unload_seconds=None, backend_args=()),
    )
    assert capabilities.read(model).capabilities == Capabilities(embedding=True)
