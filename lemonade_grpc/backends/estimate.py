"""How much memory a model's backend will need, estimated before it starts.

For a GGUF model (the `llamacpp` recipe) llama-server maps the weights and
allocates a KV cache of `ctx_size` cells: the estimate is the file size plus
that cache in f16 (2 bytes a value, keys and values for every layer and KV
head), plus a fixed allowance for the process itself and its compute
buffers. For the `command` recipe nothing is known but the file's size.
Whatever the header says, an estimate is an int from 0 to
`MAX_ESTIMATE_BYTES`, and reading the header raises nothing but OSError
and ValueError (issue 18 finding 9). Measured against llama-server's RSS in docs/configuration.md ("Memory").
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from lemonade_grpc.core.catalog import ModelSpec, Recipe
from lemonade_grpc.core.gguf import read_metadata
from lemonade_grpc.core.options import EffectiveOptions

log = logging.getLogger(__name__)

# The process, its threads and llama.cpp's compute buffers: llama-server
# holds 17 MiB resident with the bundled model at ctx 512 (docs/configuration.md,
# "Memory"); rounded up, as a floor rather than a ratio.
PROCESS_OVERHEAD_BYTES = 24 << 20
KV_BYTES_PER_VALUE = 2  # f16, llama-server's default cache type

# issue 18 finding 9: a header claiming 2^62 layers made an estimate that
# overflowed Plan's int64 `need_bytes` (INTERNAL) while Load refused it
# INSUFFICIENT_MEMORY. No estimate exceeds 1 EiB: more than any host has (so
# a clamped estimate is still refused as the true one would be), and far
# enough under 2^63 that sums of estimates still fit an int64.
MAX_ESTIMATE_BYTES = 1 << 60

# The metadata the estimate reads: the architecture, and these numbers of it.
_SHAPE_KEYS = (
    "block_count",
    "attention.head_count",
    "attention.head_count_kv",
    "embedding_length",
    "attention.key_length",
    "attention.value_length",
)


def estimate_bytes(spec: ModelSpec, options: EffectiveOptions) -> int:
    """Bytes the backend of `spec` will hold resident with `options`. Reads the file's header.

    Never raises: 0 for a file that cannot be stat'ed, the file's size for a
    header that cannot be read, and never more than `MAX_ESTIMATE_BYTES`.
    """
    try:
        stat = spec.path.stat()
    except OSError:
        return 0
    if spec.recipe is not Recipe.LLAMACPP:
        return min(stat.st_size, MAX_ESTIMATE_BYTES)
    try:
        per_cell = kv_bytes_per_cell(spec.path, stat.st_mtime)
    except OSError as error:  # not cached: out of descriptors now says nothing of the file
        log.warning("cannot read the GGUF header of %s (%s): estimating from its size", spec.path, error)
        per_cell = 0
    return min(stat.st_size + per_cell * options.ctx_size + PROCESS_OVERHEAD_BYTES, MAX_ESTIMATE_BYTES)


@functools.lru_cache(maxsize=64)
def kv_bytes_per_cell(path: Path, mtime: float) -> int:
    """KV-cache bytes per context cell of the GGUF at `path`; 0 when its header is not one we can read.

    At most `MAX_ESTIMATE_BYTES`; a negative number in the header counts as
    absent. `mtime` is part of the cache key, so a replaced file is read again.
    Raises OSError when the file cannot be read now (not cached: `lru_cache`
    keeps no exception, and a shortage of descriptors passes).
    """
    try:
        fields = read_metadata(path, wanted=_shape_key)
    except ValueError as error:  # not a GGUF we can read: the file size still counts
        log.warning("cannot read the GGUF header of %s (%s): estimating from its size", path, error)
        return 0

    def number(key: str, default: int = 0) -> int:
        value = fields.get(key)
        usable = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return value if usable else default  # type: ignore[return-value]

    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        return 0
    layers = number(f"{arch}.block_count")
    heads = number(f"{arch}.attention.head_count")
    heads_kv = number(f"{arch}.attention.head_count_kv", heads)
    head_dim = number(f"{arch}.embedding_length") // heads if heads else 0
    key_length = number(f"{arch}.attention.key_length", head_dim)
    value_length = number(f"{arch}.attention.value_length", head_dim)
    return min(layers * heads_kv * (key_length + value_length) * KV_BYTES_PER_VALUE, MAX_ESTIMATE_BYTES)


def _shape_key(key: str) -> bool:
    """Whether the estimate reads `key` (the architecture's name or one of its `_SHAPE_KEYS`)."""
    if key == "general.architecture":
        return True
    arch, _, name = key.partition(".")
    return bool(arch) and name in _SHAPE_KEYS
