"""Recipes: the command line that runs a catalog model on a given port."""

from __future__ import annotations

from lemonade_grpc.catalog import ModelSpec, Recipe
from lemonade_grpc.pool.options import EffectiveOptions
from lemonade_grpc.provision.llama_server import locate


def backend_argv(spec: ModelSpec, options: EffectiveOptions, port: int) -> list[str]:
    """The argv that starts `spec` with `options`, listening on 127.0.0.1:`port`.

    The recipe's own arguments come first, then the operator's (`spec.args`),
    then the client's extra ones (`options.backend_args`, allow-listed).

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
            *spec.args,
            *options.backend_args,
        ]
    values = {"port": str(port), "path": str(spec.path), "ctx_size": str(options.ctx_size)}
    return [part.format_map(values) for part in spec.command] + [*spec.args, *options.backend_args]
