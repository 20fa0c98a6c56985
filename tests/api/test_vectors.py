"""Embed, Tokenize and Detokenize (issue 19) on the real default model, SmolLM2-135M-Instruct.

The built-in catalog serves it twice: `smollm2` (chat) and `smollm2-embed`
(started to embed). What is asserted is what a user of each call relies
on: the ids of a known text, a round trip, the right document ranked
first, the right field named when a request is refused, and a model left
as it was by every refusal. Rerank, the last test, runs a `command`
reranker (SmolLM2 is none). What a backend's answers become, as pure
functions, is in test_vectors_answers.py.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import grpc
import pytest

from conftest import Client, Events, ServerFactory, connect, fake_model, unloaded
from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as ipb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.client import error_details

DOCUMENTS = [
    "The cat sat on the mat and purred.",
    "Paris is the capital of France.",
    "Python is a popular programming language.",
    "The stock market fell sharply today.",
    "It rained all day in London.",
]


# Each query and the document it is about.
QUERIES = {
    "What is the capital city of France?": 1,
    "Where is my cat sleeping?": 0,
    "How do I write a program in Python?": 2,
    "Did stock prices go down?": 3,
    "Is it raining in London?": 4,
}
SMOLLM2_DIMENSION = 576
SMOLLM2_VOCABULARY = 49152


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def embedding_model(name: str, path: Path, *lines: str) -> str:
    """A catalog entry (TOML) of SmolLM2 started to embed."""
    return "\n".join(
        [f"[models.{name}]", 'recipe = "llamacpp"', f'path = "{path}"', 'type = "embedding"', *lines, ""]
    )


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def norm(a: list[float]) -> float:
    return math.sqrt(dot(a, a))


async def loaded(client: Client, model: str) -> pb.ModelStatus | None:
    status = await client.control.Status(pb.StatusRequest())
    return next((m for m in status.pool.models if m.name == model), None)


async def test_tokenize_gives_smollm2s_ids_and_pieces_and_detokenize_gives_the_text_back(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    server = servers.start()
    async with connect(server.address) as client:
        tokens = await client.inference.Tokenize(ipb.TokenizeRequest(model="smollm2", text="Hello world"))
        assert list(tokens.ids) == [19556, 905]
        assert list(tokens.pieces) == []  # only when asked
        text = "Ça coûte 5 € — naïve 日本"
        tokens = await client.inference.Tokenize(
            ipb.TokenizeRequest(model="smollm2", text=text, with_pieces=True)
        )
        assert len(tokens.pieces) == len(tokens.ids) > 0
        # A piece may hold part of a character (bytes); together they are the text.
        assert b"".join(tokens.pieces) == text.encode()
        back = await client.inference.Detokenize(ipb.DetokenizeRequest(model="smollm2", ids=tokens.ids))
        assert back.text == text
        empty = await client.inference.Tokenize(ipb.TokenizeRequest(model="smollm2", text=""))
        assert list(empty.ids) == []


async def test_detokenize_names_an_id_outside_the_vocabulary_and_leaves_the_model_serving(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    server = servers.start()
    async with connect(server.address) as client:
        await client.inference.Detokenize(ipb.DetokenizeRequest(model="smollm2", ids=[19556]))
        before = await loaded(client, "smollm2")
        assert before is not None
        assert before.state == pb.MODEL_STATE_READY
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.inference.Detokenize(
                ipb.DetokenizeRequest(model="smollm2", ids=[19556, SMOLLM2_VOCABULARY, 905])
            )
        details = error_details(refused.value)
        assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
        assert details.bad_fields == ("ids[1]",)
        assert f"{SMOLLM2_VOCABULARY} tokens" in details.message
        after = await loaded(client, "smollm2")
        assert after is not None
        assert (after.state, after.pid) == (pb.MODEL_STATE_READY, before.pid)
        last = await client.inference.Detokenize(
            ipb.DetokenizeRequest(model="smollm2", ids=[19556, SMOLLM2_VOCABULARY - 1])
        )
        assert last.text.startswith("Hello")


async def test_embed_ranks_the_document_a_query_is_about_first(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    server = servers.start()
    async with connect(server.address) as client:
        documents = await client.inference.Embed(ipb.EmbedRequest(model="smollm2-embed", inputs=DOCUMENTS))
        assert documents.dimension == SMOLLM2_DIMENSION
        assert len(documents.embeddings) == len(DOCUMENTS)
        vectors = [list(e.values) for e in documents.embeddings]
        assert all(len(v) == SMOLLM2_DIMENSION for v in vectors)
        assert all(abs(norm(v) - 1) < 1e-3 for v in vectors)  # unit length by default
        assert documents.usage.prompt_tokens > len(DOCUMENTS)
        queries = await client.inference.Embed(ipb.EmbedRequest(model="smollm2-embed", inputs=list(QUERIES)))
        for query, embedding in zip(QUERIES, queries.embeddings, strict=True):
            scores = [dot(list(embedding.values), v) for v in vectors]
            assert scores.index(max(scores)) == QUERIES[query], (query, scores)
        # One text embeds the same alone as in a batch, in its place.
        alone = await client.inference.Embed(ipb.EmbedRequest(model="smollm2-embed", inputs=[DOCUMENTS[3]]))
        assert dot(list(alone.embeddings[0].values), vectors[3]) > 0.999
        raw = await client.inference.Embed(
            ipb.EmbedRequest(
                model="smollm2-embed",
                inputs=[DOCUMENTS[3]],
                normalization=ipb.EMBEDDING_NORMALIZATION_NONE,
            )
        )
        values = list(raw.embeddings[0].values)
        assert abs(norm(values) - 1) > 0.01  # not scaled...
        assert dot([x / norm(values) for x in values], vectors[3]) > 0.999  # ...the same direction


async def test_embed_on_a_chat_model_names_the_missing_capability_and_loads_nothing(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    server = servers.start()
    async with connect(server.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.inference.Embed(ipb.EmbedRequest(model="smollm2", inputs=["hello"]))
        details = error_details(refused.value)
        assert (details.code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "CAPABILITY_MISSING")
        assert details.metadata == {"model": "smollm2", "capability": "embedding"}
        status = await client.control.Status(pb.StatusRequest())
        assert list(status.pool.models) == []


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [
        (ipb.EmbedRequest(model="smollm2-embed"), grpc.StatusCode.INVALID_ARGUMENT, "inputs"),
        (
            ipb.EmbedRequest(model="smollm2-embed", inputs=["a", ""]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs[1]",
        ),
        (
            ipb.EmbedRequest(model="smollm2-embed", inputs=["a"] * 1025),
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs",
        ),
        (ipb.EmbedRequest(inputs=["a"]), grpc.StatusCode.INVALID_ARGUMENT, "model"),
        (
            ipb.EmbedRequest(model="smollm2-embed", inputs=["a"], normalization=99),  # type: ignore[arg-type]
            grpc.StatusCode.INVALID_ARGUMENT,
            "normalization",
        ),
        (ipb.EmbedRequest(model="no-such-model", inputs=["a"]), grpc.StatusCode.NOT_FOUND, None),
    ],
    ids=["no-inputs", "empty-input", "too-many", "no-model", "bad-normalization", "unknown-model"],
)
async def test_a_bad_embed_request_is_refused_naming_its_field_before_anything_loads(
    servers: ServerFactory,
    smollm2_model: Path,
    request_: ipb.EmbedRequest,
    code: grpc.StatusCode,
    field: str | None,
) -> None:
    server = servers.start()
    async with connect(server.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.inference.Embed(request_)
        details = error_details(refused.value)
        assert details.code == code
        assert details.bad_fields == ((field,) if field else ())
        status = await client.control.Status(pb.StatusRequest())
        assert list(status.pool.models) == []


async def test_an_embed_input_longer_than_the_context_is_named_and_the_model_keeps_serving(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    # llama-server makes a context of at least 256 cells, whatever it is asked.
    config = embedding_model("short", smollm2_model, "ctx_size = 256")
    server = servers.start(config)
    long_text = " ".join(["word"] * 1000)
    async with connect(server.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.inference.Embed(
                ipb.EmbedRequest(model="short", inputs=["a cat", long_text, "a dog"])
            )
        details = error_details(refused.value)
        assert (details.code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
        assert details.bad_fields == ("inputs[1]",)
        before = await loaded(client, "short")
        assert before is not None
        assert before.state == pb.MODEL_STATE_READY
        answer = await client.inference.Embed(ipb.EmbedRequest(model="short", inputs=["a cat", "a dog"]))
        assert len(answer.embeddings) == 2
        after = await loaded(client, "short")
        assert after is not None
        assert after.pid == before.pid


async def test_an_embedding_model_in_continuous_use_is_not_unloaded_as_idle(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    """issue 19: a caller bypassing the service lost its model to the idle timer while using it."""
    idle = 2
    server = servers.start(
        embedding_model("embed", smollm2_model, "ctx_size = 256", f"idle_unload_seconds = {idle}")
    )
    async with connect(server.address) as client:
        events = Events(client.control)
        await client.inference.Embed(ipb.EmbedRequest(model="embed", inputs=["start"]))
        first = await loaded(client, "embed")
        assert first is not None
        # Calls back to back for three idle periods: the timer never runs out while they come.
        started = time.monotonic()
        while time.monotonic() - started < 3 * idle:
            await client.inference.Embed(ipb.EmbedRequest(model="embed", inputs=["still here"]))
        now = await loaded(client, "embed")
        assert now is not None
        assert (now.state, now.pid) == (pb.MODEL_STATE_READY, first.pid)
        assert not [m for _, m in events.seen if m.HasField("model_unloaded")]
        # Left alone, it goes (the timer was running all along).
        await events.wait_for(
            unloaded("embed", pb.UNLOAD_REASON_IDLE), 60, "the idle unload once calls stopped"
        )
        events.close()


async def test_vectors_calls_on_the_tiny_model_are_relayed_too(servers: ServerFactory) -> None:
    """Tokenize and Detokenize work on any llama-server model (here, the tiny generated one)."""
    server = servers.start()
    async with connect(server.address) as client:
        tokens = await client.inference.Tokenize(ipb.TokenizeRequest(model="tiny", text="abc"))
        assert len(tokens.ids) > 0
        back = await client.inference.Detokenize(ipb.DetokenizeRequest(model="tiny", ids=tokens.ids))
        assert back.text.lstrip() == "abc"  # its vocabulary marks a word start with a space


async def test_rerank_ranks_documents_best_first_and_needs_a_reranker(
    servers: ServerFactory, tiny_model: Path, smollm2_model: Path
) -> None:
    """A `command` reranker (the fake backend scores the query's words a document holds); SmolLM2 is none."""
    config = fake_model("ranker", tiny_model, type_="embedding") + (
        f'[models.smollm2-embed]\npath = "{smollm2_model}"\ntype = "embedding"\n'
    )
    server = servers.start(config)
    documents = ["a cat on a mat", "paris is in france", "the capital of france is paris"]
    async with connect(server.address) as client:
        ranked = await client.inference.Rerank(
            ipb.RerankRequest(model="ranker", query="capital of france", documents=documents)
        )
        assert [r.index for r in ranked.results] == [2, 1, 0]
        assert ranked.results[0].score > ranked.results[1].score > ranked.results[2].score
        best = await client.inference.Rerank(
            ipb.RerankRequest(model="ranker", query="capital of france", documents=documents, top_n=1)
        )
        assert [r.index for r in best.results] == [2]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.inference.Rerank(
                ipb.RerankRequest(model="smollm2-embed", query="q", documents=["d"])
            )
        details = error_details(refused.value)
        assert (details.reason, details.metadata["capability"]) == ("CAPABILITY_MISSING", "rerank")
        for bad, field in (
            (ipb.RerankRequest(model="ranker", documents=["d"]), "query"),
            (ipb.RerankRequest(model="ranker", query="q"), "documents"),
            (ipb.RerankRequest(model="ranker", query="q", documents=["d", ""]), "documents[1]"),
            (ipb.RerankRequest(model="ranker", query="q", documents=["d"], top_n=0), "top_n"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.inference.Rerank(bad)
            assert error_details(refused.value).bad_fields == (field,)
        assert [m.name for m in (await client.control.Status(pb.StatusRequest())).pool.models] == ["ranker"]
