"""Embed, Rerank, Tokenize and Detokenize: requests checked into llama-server payloads, answers into messages.

Pure functions. A request is refused INVALID_ARGUMENT naming the field
before any model is loaded; an answer whose shape is not what llama-server
sends is the backend's fault (`BackendError`), never a bug of ours.
"""

from __future__ import annotations

import math
import re
from typing import Any, Protocol, TypeGuard

from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as pb
from lemonade_grpc.core import bounds
from lemonade_grpc.core.catalog import ModelSpec, ModelType, Recipe
from lemonade_grpc.core.errors import BackendError, CapabilityMissing, InvalidRequest

# llama-server's `embd_normalize`: 2 is Euclidean, -1 none.
NORMALIZATIONS = {
    pb.EMBEDDING_NORMALIZATION_UNSPECIFIED: 2,
    pb.EMBEDDING_NORMALIZATION_EUCLIDEAN: 2,
    pb.EMBEDDING_NORMALIZATION_NONE: -1,
}
# What llama-server says of an input longer than its context (400
# exceed_context_size_error) or than a batch (500; `recipes.embedding_args`
# sizes batches to the context).
TOO_LARGE = re.compile(r"\((\d+) tokens\) (?:exceeds the available context size|is too large to process)")
_UINT32_MAX = (1 << 32) - 1


class _Named(Protocol):
    @property
    def model(self) -> str: ...


def require_model(request: _Named) -> str:
    """The request's model name; `InvalidRequest` naming the field when it has none."""
    if not request.model:
        raise InvalidRequest("model is required", field="model")
    return request.model


def check_embedding_model(spec: ModelSpec) -> None:
    """Raise `CapabilityMissing` unless `spec` is started to embed (a model of type embedding)."""
    if spec.type is not ModelType.EMBEDDING:
        raise CapabilityMissing(
            spec.name,
            "embedding",
            f"{spec.name} is a model of type {spec.type.value}, not started to embed: Embed needs a"
            ' model of type "embedding" (the catalog\'s `type`)',
        )


def check_reranker(spec: ModelSpec) -> None:
    """Raise `CapabilityMissing` unless `spec` can rerank.

    A llamacpp model must be a reranker (pooling rank); a `command`
    backend of type embedding is trusted to be one.
    """
    able = spec.capabilities.rerank if spec.recipe is Recipe.LLAMACPP else spec.type is ModelType.EMBEDDING
    if not able:
        raise CapabilityMissing(
            spec.name,
            "rerank",
            f"{spec.name} is not a reranker: Rerank needs a model of type embedding with pooling rank",
        )


def rerank_payload(request: pb.RerankRequest) -> dict[str, Any]:
    """The /v1/rerank body of `request`; raises `InvalidRequest` naming a bad field."""
    require_model(request)
    if not request.query:
        raise InvalidRequest("query is required", field="query")
    if len(request.documents) not in bounds.EMBED_INPUTS:
        raise InvalidRequest(
            f"documents must hold {bounds.EMBED_INPUTS} texts, got {len(request.documents)}",
            field="documents",
        )
    for index, text in enumerate(request.documents):
        if not text:
            raise InvalidRequest(f"documents[{index}] is empty", field=f"documents[{index}]")
    payload: dict[str, Any] = {"query": request.query, "documents": list(request.documents)}
    if request.HasField("top_n"):
        if request.top_n < 1:
            raise InvalidRequest("top_n must be at least 1", field="top_n")
        payload["top_n"] = request.top_n
    return payload


def rerank_response(answer: Any, documents: int, top_n: int | None) -> pb.RerankResponse:
    """`answer` (llama-server's /v1/rerank) as results best first, at most `top_n` of them."""
    results = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(results, list) or len(results) > documents:
        raise _malformed("expected a list of results, at most one per document")
    scored: dict[int, float] = {}
    for result in results:
        index = result.get("index") if isinstance(result, dict) else None
        score = result.get("relevance_score") if isinstance(result, dict) else None
        if type(index) is not int or not 0 <= index < documents or index in scored or not _finite(score):
            raise _malformed("a result's index is missing, out of range or repeated, or its score no number")
        scored[index] = float(score)
    best = sorted(scored.items(), key=lambda item: (-item[1], item[0]))[:top_n]
    response = pb.RerankResponse(results=[pb.RerankResult(index=i, score=s) for i, s in best])
    usage = answer.get("usage")
    if isinstance(usage, dict) and _count(usage.get("prompt_tokens")):
        response.usage.prompt_tokens = usage["prompt_tokens"]
    return response


def embed_payload(request: pb.EmbedRequest) -> dict[str, Any]:
    """The /v1/embeddings body of `request`; raises `InvalidRequest` naming a bad field."""
    require_model(request)
    if len(request.inputs) not in bounds.EMBED_INPUTS:
        raise InvalidRequest(
            f"inputs must hold {bounds.EMBED_INPUTS} texts, got {len(request.inputs)}", field="inputs"
        )
    for index, text in enumerate(request.inputs):
        if not text:
            raise InvalidRequest(f"inputs[{index}] is empty", field=f"inputs[{index}]")
    if request.normalization not in NORMALIZATIONS:
        raise InvalidRequest(f"unknown normalization {request.normalization}", field="normalization")
    return {"input": list(request.inputs), "embd_normalize": NORMALIZATIONS[request.normalization]}


def embed_response(answer: Any, inputs: int) -> pb.EmbedResponse:
    """`answer` (an OpenAI embeddings list) as an `EmbedResponse` of `inputs` vectors, in input order."""
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list) or len(data) != inputs:
        raise _malformed(f"expected {inputs} embeddings")
    vectors: list[list[float] | None] = [None] * inputs
    for item in data:
        index = item.get("index") if isinstance(item, dict) else None
        vector = item.get("embedding") if isinstance(item, dict) else None
        if type(index) is not int or not 0 <= index < inputs or vectors[index] is not None:
            raise _malformed("an embedding's index is missing, out of range or repeated")
        if not isinstance(vector, list) or not vector or not all(_finite(x) for x in vector):
            raise _malformed(f"embedding {index} is not a list of numbers")
        vectors[index] = vector
    dimension = len(vectors[0] or ())
    if any(len(v or ()) != dimension for v in vectors):
        raise _malformed("embeddings of different lengths")
    response = pb.EmbedResponse(dimension=dimension)
    for vector in vectors:
        response.embeddings.add().values.extend(vector or ())
    usage = answer.get("usage")
    if isinstance(usage, dict) and _count(usage.get("prompt_tokens")):
        response.usage.prompt_tokens = usage["prompt_tokens"]
    return response


def too_large(message: str) -> int | None:
    """The token count of an input llama-server refused as longer than a batch, else None."""
    match = TOO_LARGE.search(message)
    return int(match.group(1)) if match else None


def tokenize_payload(request: pb.TokenizeRequest) -> dict[str, Any]:
    """The /tokenize body of `request`."""
    require_model(request)
    return {"content": request.text, "add_special": request.add_special, "with_pieces": request.with_pieces}


def tokenize_response(answer: Any, with_pieces: bool) -> pb.TokenizeResponse:
    """`answer` (llama-server's /tokenize) as a `TokenizeResponse`.

    With pieces, each token is `{"id", "piece"}`; a piece is a string, or a
    list of byte values when it is not valid UTF-8 alone.
    """
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    if not isinstance(tokens, list):
        raise _malformed("expected a list of tokens")
    response = pb.TokenizeResponse()
    for token in tokens:
        if with_pieces:
            token_id = token.get("id") if isinstance(token, dict) else None
            piece = token.get("piece") if isinstance(token, dict) else None
            response.pieces.append(_piece_bytes(piece))
        else:
            token_id = token
        if not _count(token_id):
            raise _malformed(f"a token id that is not a uint32: {str(token_id)[:50]}")
        response.ids.append(token_id)
    return response


def detokenize_payload(request: pb.DetokenizeRequest, vocabulary: int | None) -> dict[str, Any]:
    """The /detokenize body of `request`; every id below `vocabulary` (when it is known)."""
    require_model(request)
    if len(request.ids) > bounds.TOKEN_IDS:
        raise InvalidRequest(
            f"ids holds at most {bounds.TOKEN_IDS:,} ids, got {len(request.ids):,}", field="ids"
        )
    if vocabulary is not None:
        for index, token_id in enumerate(request.ids):
            if token_id >= vocabulary:
                raise InvalidRequest(
                    f"ids[{index}] is {token_id}, outside the vocabulary of {request.model}"
                    f" ({vocabulary} tokens: ids 0..{vocabulary - 1})",
                    field=f"ids[{index}]",
                )
    return {"tokens": list(request.ids)}


def detokenize_response(answer: Any) -> pb.DetokenizeResponse:
    content = answer.get("content") if isinstance(answer, dict) else None
    if not isinstance(content, str):
        raise _malformed("expected the text as `content`")
    return pb.DetokenizeResponse(text=content)


def vocabulary_size(answer: Any) -> int | None:
    """`n_vocab` from llama-server's /v1/models answer; None when it does not say."""
    data = answer.get("data") if isinstance(answer, dict) else None
    meta = data[0].get("meta") if isinstance(data, list) and data and isinstance(data[0], dict) else None
    size = meta.get("n_vocab") if isinstance(meta, dict) else None
    return size if type(size) is int and 0 < size <= _UINT32_MAX else None


def _piece_bytes(piece: object) -> bytes:
    if isinstance(piece, str):
        return piece.encode("utf-8", "surrogatepass")
    if isinstance(piece, list) and all(type(b) is int and 0 <= b <= 255 for b in piece):
        return bytes(piece)
    raise _malformed(f"a token piece that is neither text nor bytes: {str(piece)[:50]}")


def _finite(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: object) -> TypeGuard[int]:
    return type(value) is int and 0 <= value <= _UINT32_MAX


def _malformed(what: str) -> BackendError:
    return BackendError(f"the backend's answer is malformed: {what}")
