"""How much memory a model's backend will need, estimated before it starts.

For a GGUF model (the `llamacpp` recipe) llama-server maps the weights and
allocates a KV cache of `ctx_size` cells: the estimate is the file size plus
that cache in f16 (2 bytes a value, keys and values for every layer and KV
head), plus a fixed allowance for the process itself and its compute
buffers. For the `command` recipe nothing is known but the file's size.
Measured against llama-server's RSS in docs/configuration.md ("Memory").
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from lemonade_grpc.catalog import ModelSpec, Recipe
from lemonade_grpc.pool.options import EffectiveOptions

log = logging.getLogger(__name__)

# The process, its threads and llama.cpp's compute buffers: llama-server
# holds 17 MiB resident with the bundled model at ctx 512 (docs/configuration.md,
# "Memory"); rounded up, as a floor rather than a ratio.
PROCESS_OVERHEAD_BYTES = 24 << 20
KV_BYTES_PER_VALUE = 2  # f16, llama-server's default cache type


def estimate_bytes(spec: ModelSpec, options: EffectiveOptions) -> int:
    """Bytes the backend of `spec` will hold resident with `options`. Reads the file's header."""
    try:
        stat = spec.path.stat()
    except OSError:
        return 0
    if spec.recipe is not Recipe.LLAMACPP:
        return stat.st_size
    per_cell = kv_bytes_per_cell(spec.path, stat.st_mtime)
    return stat.st_size + per_cell * options.ctx_size + PROCESS_OVERHEAD_BYTES


@functools.lru_cache(maxsize=64)
def kv_bytes_per_cell(path: Path, mtime: float) -> int:
    """KV-cache bytes per context cell of the GGUF at `path`; 0 when its header cannot be read.

    `mtime` is part of the cache key, so a replaced file is read again.
    """
    import gguf  # imported here: only the estimate needs it, and it pulls numpy

    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as error:  # not a GGUF we can read: the file size still counts
        log.warning("cannot read the GGUF header of %s (%s): estimating from its size", path, error)
        return 0

    def number(key: str, default: int = 0) -> int:
        field = reader.get_field(key)
        value = field.contents() if field is not None else None
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    arch_field = reader.get_field("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if not isinstance(arch, str):
        return 0
    layers = number(f"{arch}.block_count")
    heads = number(f"{arch}.attention.head_count")
    heads_kv = number(f"{arch}.attention.head_count_kv", heads)
    head_dim = number(f"{arch}.embedding_length") // heads if heads else 0
    key_length = number(f"{arch}.attention.key_length", head_dim)
    value_length = number(f"{arch}.attention.value_length", head_dim)
    return layers * heads_kv * (key_length + value_length) * KV_BYTES_PER_VALUE
