"""Recipes: the command line that runs a catalog model on a given port."""

from __future__ import annotations

from lemonade_grpc.core.catalog import ModelSpec, ModelType, Recipe
from lemonade_grpc.core.options import EffectiveOptions
from lemonade_grpc.provision.llama_server import locate


def backend_argv(spec: ModelSpec, options: EffectiveOptions, port: int) -> list[str]:
    """The argv that starts `spec` with `options`, listening on 127.0.0.1:`port`.

    The recipe's own arguments come first, then the operator's (`spec.args`),
    then the client's extra ones (`options.backend_args`, allow-listed):
    llama-server takes a flag's last value, so theirs win over the recipe's.
    An `embedding` model is started to embed (`embedding_args`).

    Raises `LlamaServerNotFound` for the llamacpp recipe when no llama-server
    can be found; raises KeyError for a `command` template naming an unknown
    placeholder (config validation rejects those first).
    """
    if spec.recipe is Recipe.LLAMACPP:
        return [
            str(locate()),
            "--model",
            str(spec.path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--ctx-size",
            str(options.ctx_size),
            "--no-webui",
            *(embedding_args(spec, options) if spec.type is ModelType.EMBEDDING else ()),
            *(("--mmproj", str(spec.mmproj)) if spec.mmproj is not None else ()),
            *spec.args,
            *options.backend_args,
        ]
    values = {"port": str(port), "path": str(spec.path), "ctx_size": str(options.ctx_size)}
    return [part.format_map(values) for part in spec.command] + [*spec.args, *options.backend_args]


def embedding_args(spec: ModelSpec, options: EffectiveOptions) -> list[str]:
    """What makes llama-server embed (issue 19: operators no longer write `--embedding` by hand).

    The /v1/embeddings endpoint on, the catalog's pooling (else the model's
    own), and a batch as large as the context: llama-server embeds an input
    in one batch, and refused any over 512 tokens ("increase the physical
    batch size") although the context held it.
    """
    pooling = ["--pooling", spec.pooling] if spec.pooling is not None else []
    batch = str(options.ctx_size)
    return ["--embeddings", *pooling, "--batch-size", batch, "--ubatch-size", batch]
