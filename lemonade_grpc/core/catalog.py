"""The catalog: every model the server can load, and how to run it."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from lemonade_grpc.core.options import EffectiveOptions


class ModelType(enum.Enum):
    """Slot pool a model occupies (`[pool] max_loaded`)."""

    LLM = "llm"
    EMBEDDING = "embedding"


class Recipe(enum.Enum):
    """How a model's backend process is started."""

    LLAMACPP = "llamacpp"
    COMMAND = "command"


# The --pooling values of llama-server that Embed (OpenAI embeddings) and Rerank (rank) can use.
POOLINGS = ("last", "mean", "cls", "rank")


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What requests a model can serve (`capabilities.read` fills it from the GGUF and the entry)."""

    chat_template: bool = False
    tools: bool = False
    embedding: bool = False
    embedding_dimension: int = 0
    rerank: bool = False
    context_length: int = 0
    vision: bool = False


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A catalog entry.

    `command` is the argv template of the `command` recipe. `args` are the
    operator's backend arguments, always passed; `allowed_args` the flags a
    client may add with `options.backend_args` (none unless the operator
    says so). `pooling` is how an `embedding` model's llama-server pools
    token vectors into one (`POOLINGS`); None: the model's own (its GGUF
    says). `capabilities`: what it can serve, read from its file at
    start-up (`capabilities.read`); all false until then. `mmproj` is a
    vision model's projector (llama-server's `--mmproj`).
    """

    name: str
    recipe: Recipe
    path: Path
    type: ModelType
    defaults: EffectiveOptions
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    allowed_args: frozenset[str] = frozenset()
    pooling: str | None = None
    mmproj: Path | None = None
    capabilities: Capabilities = Capabilities()
