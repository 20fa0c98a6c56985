"""What a catalog model can serve, from its GGUF metadata and its catalog entry.

Read once at start-up (`read`), shown in ListModels and Status, and used to
refuse early what a model cannot serve (Chat with tools on a model whose
chat template takes none: FAILED_PRECONDITION CAPABILITY_MISSING, never a
backend's 500 or a silent answer in prose). For a `command` backend nothing
is known of the file: only what the catalog says (its type), and nothing is
refused for it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

from lemonade_grpc.core.catalog import Capabilities, ModelSpec, ModelType, Recipe
from lemonade_grpc.core.gguf import read_metadata

log = logging.getLogger(__name__)

_UINT32_MAX = (1 << 32) - 1
# llama.cpp's pooling types (`{arch}.pooling_type`): 4 is rank.
_RANK = 4


def read(spec: ModelSpec) -> ModelSpec:
    """`spec` with its capabilities (its GGUF's header read for a llamacpp model). Never raises."""
    metadata: Mapping[str, object] = {}
    if spec.recipe is Recipe.LLAMACPP:
        try:
            metadata = read_metadata(spec.path, wanted=_wanted)
        except (OSError, ValueError) as error:
            log.warning(
                "cannot read the GGUF header of %s (%s): its capabilities are unknown", spec.path, error
            )
    return dataclasses.replace(spec, capabilities=of(spec, metadata))


def of(spec: ModelSpec, metadata: Mapping[str, object]) -> Capabilities:
    """The capabilities of `spec` given its GGUF `metadata` (empty when unknown). Pure."""
    embedding = spec.type is ModelType.EMBEDDING
    if spec.recipe is not Recipe.LLAMACPP:
        return Capabilities(embedding=embedding)
    arch = metadata.get("general.architecture")
    prefix = f"{arch}." if isinstance(arch, str) else "\0"
    template = metadata.get("tokenizer.chat_template")
    template = template if isinstance(template, str) else ""
    pooling_rank = spec.pooling == "rank" or (
        spec.pooling is None and metadata.get(prefix + "pooling_type") == _RANK
    )
    return Capabilities(
        chat_template=bool(template),
        # A template that takes tools reads the `tools` variable (llama.cpp renders them into the prompt).
        tools="tools" in template,
        embedding=embedding,
        embedding_dimension=_count(metadata.get(prefix + "embedding_length")) if embedding else 0,
        rerank=embedding and pooling_rank,
        context_length=_count(metadata.get(prefix + "context_length")),
        vision=spec.mmproj is not None,
    )


def _wanted(key: str) -> bool:
    return key in ("general.architecture", "tokenizer.chat_template") or key.endswith(
        (".embedding_length", ".context_length", ".pooling_type")
    )


def _count(value: object) -> int:
    return value if type(value) is int and 0 <= value <= _UINT32_MAX else 0
