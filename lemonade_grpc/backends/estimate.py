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
import io
import logging
import os
import struct
from pathlib import Path
from typing import Any

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
    try:
        fields = read_metadata(path)
    except (OSError, ValueError) as error:  # not a GGUF we can read: the file size still counts
        log.warning("cannot read the GGUF header of %s (%s): estimating from its size", path, error)
        return 0

    def number(key: str, default: int = 0) -> int:
        value = fields.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        return 0
    layers = number(f"{arch}.block_count")
    heads = number(f"{arch}.attention.head_count")
    heads_kv = number(f"{arch}.attention.head_count_kv", heads)
    head_dim = number(f"{arch}.embedding_length") // heads if heads else 0
    key_length = number(f"{arch}.attention.key_length", head_dim)
    value_length = number(f"{arch}.attention.value_length", head_dim)
    return layers * heads_kv * (key_length + value_length) * KV_BYTES_PER_VALUE


# GGUF's metadata value types: struct format of the scalars; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
MAX_KEYS = 1 << 16
MAX_STRING_BYTES = 1 << 26


def read_metadata(path: Path) -> dict[str, int | float | bool | str]:
    """The scalar and string metadata of a GGUF file (arrays skipped), read from its header alone.

    Not the `gguf` package: it pulls numpy into the serving process (12 MiB
    resident, issue 13's control-plane memory row) for a handful of integers.
    Raises ValueError for a file that is not a GGUF (version 2 or 3,
    little-endian) or is cut short.
    """
    with path.open("rb") as file:
        reader = io.BufferedReader(file, buffer_size=1 << 16)

        def take(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            data = reader.read(size)
            if len(data) != size:
                raise ValueError("the header is cut short")
            return struct.unpack("<" + fmt, data)[0]

        def string() -> str:
            length = take("Q")
            if length > MAX_STRING_BYTES:
                raise ValueError(f"a string of {length} bytes")
            data = reader.read(length)
            if len(data) != length:
                raise ValueError("the header is cut short")
            return data.decode("utf-8", "replace")

        def skip(kind: int, count: int) -> None:
            if kind == _STRING:
                for _ in range(count):
                    reader.seek(take("Q"), os.SEEK_CUR)
            elif kind in _SCALARS:
                reader.seek(struct.calcsize(_SCALARS[kind]) * count, os.SEEK_CUR)
            elif kind == _ARRAY:
                for _ in range(count):
                    inner = take("I")
                    skip(inner, take("Q"))
            else:
                raise ValueError(f"unknown value type {kind}")

        if reader.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        if take("I") not in (2, 3):
            raise ValueError("an unsupported GGUF version")
        take("Q")  # tensors
        keys = take("Q")
        if keys > MAX_KEYS:
            raise ValueError(f"{keys} metadata keys")
        fields: dict[str, int | float | bool | str] = {}
        for _ in range(keys):
            key = string()
            kind = take("I")
            if kind == _STRING:
                fields[key] = string()
            elif kind in _SCALARS:
                fields[key] = take(_SCALARS[kind])
            elif kind == _ARRAY:
                inner = take("I")
                skip(inner, take("Q"))
            else:
                raise ValueError(f"unknown value type {kind}")
        return fields
