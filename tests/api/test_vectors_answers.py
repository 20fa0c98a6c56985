"""A backend's answers to Embed, Tokenize and Detokenize, read by `api.vectors` (pure functions).

Whatever a backend sends, reading it either gives a well-formed message or
raises `BackendError` (its fault, UNAVAILABLE BACKEND_ERROR): never another
exception, which would reach the client as INTERNAL.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as pb
from lemonade_grpc.api import vectors
from lemonade_grpc.core.errors import BackendError, InvalidRequest


def embeddings(*vectors_: list[float], order: list[int] | None = None) -> dict[str, Any]:
    data = [{"index": i, "embedding": v, "object": "embedding"} for i, v in enumerate(vectors_)]
    if order is not None:
        data = [data[i] for i in order]
    return {"object": "list", "data": data, "usage": {"prompt_tokens": 7, "total_tokens": 7}}


def test_embeddings_come_back_in_input_order_whatever_order_the_backend_sends() -> None:
    answer = embeddings([1.0, 0.0], [0.0, 1.0], [0.5, 0.5], order=[2, 0, 1])
    response = vectors.embed_response(answer, 3)
    assert [list(e.values) for e in response.embeddings] == [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    assert (response.dimension, response.usage.prompt_tokens) == (2, 7)


@pytest.mark.parametrize(
    ("answer", "inputs"),
    [
        (embeddings([1.0], [2.0]), 3),  # one missing
        ({"data": [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [2.0]}]}, 2),  # repeated
        ({"data": [{"index": 5, "embedding": [1.0]}]}, 1),  # out of range
        (embeddings([1.0, 2.0], [1.0]), 2),  # lengths differ
        (embeddings([math.nan]), 1),
        (embeddings([]), 1),
        ({"data": [{"index": 0, "embedding": ["1"]}]}, 1),
        ({"data": [{"index": True, "embedding": [1.0]}]}, 1),
        ([], 1),
        ({"error": "x"}, 1),
    ],
)
def test_a_malformed_embeddings_answer_is_the_backends_fault(answer: Any, inputs: int) -> None:
    with pytest.raises(BackendError, match="malformed"):
        vectors.embed_response(answer, inputs)


def test_token_pieces_may_be_text_or_bytes_and_ids_must_be_uint32() -> None:
    answer = {
        "tokens": [{"id": 1, "piece": "Hel"}, {"id": 2, "piece": [0xE2, 0x82]}, {"id": 3, "piece": [0xAC]}]
    }
    response = vectors.tokenize_response(answer, with_pieces=True)
    assert list(response.ids) == [1, 2, 3]
    assert b"".join(response.pieces) == "Hel€".encode()
    for bad in ({"tokens": [-1]}, {"tokens": [1 << 32]}, {"tokens": ["7"]}, {"tokens": 3}, {}):
        with pytest.raises(BackendError):
            vectors.tokenize_response(bad, with_pieces=False)
    with pytest.raises(BackendError):
        vectors.tokenize_response({"tokens": [{"id": 1, "piece": [256]}]}, with_pieces=True)


def test_rerank_results_come_best_first_and_a_malformed_answer_is_the_backends_fault() -> None:
    answer = {"results": [{"index": 0, "relevance_score": -1.5}, {"index": 2, "relevance_score": 3.0}]}
    response = vectors.rerank_response(answer, 3, None)
    assert [(r.index, r.score) for r in response.results] == [(2, 3.0), (0, -1.5)]
    assert [r.index for r in vectors.rerank_response(answer, 3, 1).results] == [2]
    bads: list[Any] = [
        {"results": [{"index": 3, "relevance_score": 1.0}]},
        {"results": [{"index": 0, "relevance_score": 1.0}, {"index": 0, "relevance_score": 2.0}]},
        {"results": [{"index": 0, "relevance_score": "high"}]},
        {"results": [{"index": 0, "relevance_score": math.inf}]},
        {"results": {}},
    ]
    for bad in bads:
        with pytest.raises(BackendError):
            vectors.rerank_response(bad, 3, None)


def test_the_vocabulary_size_is_read_from_the_models_list_or_left_unknown() -> None:
    assert vectors.vocabulary_size({"data": [{"meta": {"n_vocab": 49152}}]}) == 49152
    unknowns: list[Any] = [
        {},
        {"data": []},
        {"data": [{"meta": {"n_vocab": 0}}]},
        {"data": [{"meta": None}]},
        [],
    ]
    for unknown in unknowns:
        assert vectors.vocabulary_size(unknown) is None


def test_ids_are_checked_against_the_vocabulary_only_when_it_is_known() -> None:
    request = pb.DetokenizeRequest(model="m", ids=[1, 2, 70000])
    assert vectors.detokenize_payload(request, None) == {"tokens": [1, 2, 70000]}
    with pytest.raises(InvalidRequest) as refused:
        vectors.detokenize_payload(request, 49152)
    assert refused.value.field == "ids[2]"


def test_the_token_count_of_an_input_too_long_is_read_from_either_of_llama_servers_messages() -> None:
    assert vectors.too_large("request (1000 tokens) exceeds the available context size (256 tokens)") == 1000
    assert (
        vectors.too_large("input (700 tokens) is too large to process. increase the physical batch size")
        == 700
    )
    assert vectors.too_large("Input content cannot be empty") is None


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=9), inner, max_size=4),
    max_leaves=20,
)
KEYS = st.sampled_from(
    ["data", "index", "embedding", "usage", "prompt_tokens", "tokens", "id", "piece", "content"]
)
SHAPED = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**33) | st.floats() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=300)
@given(answer=st.one_of(JSON, SHAPED), inputs=st.integers(1, 3), pieces=st.booleans())
def test_any_answer_is_read_or_refused_as_the_backends_fault(answer: Any, inputs: int, pieces: bool) -> None:
    for read in (
        lambda: vectors.embed_response(answer, inputs),
        lambda: vectors.tokenize_response(answer, pieces),
        lambda: vectors.detokenize_response(answer),
        lambda: vectors.rerank_response(answer, inputs, None),
    ):
        with contextlib.suppress(BackendError):
            read()
    size = vectors.vocabulary_size(answer)
    assert size is None or size > 0
