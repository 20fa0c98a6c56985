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
import io
import logging
import os
import struct
from collections.abc import Callable
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


# GGUF's metadata value types, numbered by position: the scalars' struct
# formats, and "." for 8 (string) and 9 (array).
_SCALARS = {kind: struct.Struct("<" + fmt) for kind, fmt in enumerate("BbHhIif?..Qqd") if fmt != "."}
_STRING, _ARRAY = 8, 9
_U32, _U64 = _SCALARS[4], _SCALARS[10]
_MAGIC = struct.Struct("<4s")

# Bounds on what a header may make the reader do (issue 18 finding 9: arrays
# nested 3,000 deep overflowed the recursion and answered INTERNAL). Past
# any of them the header is refused (ValueError) and the estimate falls
# back to the file's size. Real models are far inside them: GGUF writers
# nest no arrays, and the largest vocabularies (Gemma's 262,144 tokens,
# Llama 3's 128,256 tokens and 280,147 merges) are under 2^19 strings.
MAX_KEYS = 1 << 16
MAX_KEY_BYTES = (1 << 16) - 1  # GGUF's own limit on a key
MAX_STRING_BYTES = 1 << 26  # a string value read (a chat template is tens of KiB)
MAX_NESTING = 16  # arrays of arrays
# Strings and arrays inside arrays, which are walked one by one (scalars are
# skipped in one seek): 0.9 s of reading at most here, once per file version.
MAX_ARRAY_ITEMS = 1 << 21


class _Header:
    """A GGUF header read front to back; every length is checked against what is left of the file.

    Raises ValueError for anything past the bounds or the end of the file,
    and nothing else but OSError: no recursion deeper than `MAX_NESTING`, no
    seek or read larger than the file, no loop longer than `MAX_ARRAY_ITEMS`.
    """

    def __init__(self, file: io.BufferedReader, size: int) -> None:
        self._file = file
        self._left = size  # bytes of the file after the position
        self._items = 0

    def number(self, kind: struct.Struct) -> Any:
        data = self._file.read(kind.size)
        if len(data) != kind.size:
            raise ValueError("the header is cut short")
        self._left -= kind.size
        return kind.unpack(data)[0]

    def skip(self, length: int) -> None:
        if length > self._left:
            raise ValueError("the header is cut short")
        self._file.seek(length, os.SEEK_CUR)
        self._left -= length

    def string(self, limit: int) -> str:
        length = self.number(_U64)
        if length > limit:
            raise ValueError(f"a string of {length} bytes")
        if length > self._left:
            raise ValueError("the header is cut short")
        data = self._file.read(length)
        if len(data) != length:
            raise ValueError("the header is cut short")
        self._left -= length
        return data.decode("utf-8", "replace")

    def skip_string(self) -> None:
        self.skip(self.number(_U64))

    def skip_array(self, depth: int = 1) -> None:
        """Skip an array value (its item type, count and items), `depth` arrays deep."""
        if depth > MAX_NESTING:
            raise ValueError(f"arrays nested more than {MAX_NESTING} deep")
        kind = self.number(_U32)
        count = self.number(_U64)
        scalar = _SCALARS.get(kind)
        if scalar is not None:
            self.skip(scalar.size * count)
            return
        if kind not in (_STRING, _ARRAY):
            raise ValueError(f"unknown value type {kind}")
        # Each item takes at least its length (8 bytes) or its type and count (12): a
        # count the file cannot hold is refused before any of it is walked.
        if count * 8 > self._left:
            raise ValueError("the header is cut short")
        self._items += count
        if self._items > MAX_ARRAY_ITEMS:
            raise ValueError(f"more than {MAX_ARRAY_ITEMS:,} strings and arrays in arrays")
        for _ in range(count):
            if kind == _STRING:
                self.skip_string()
            else:
                self.skip_array(depth + 1)


def read_metadata(
    path: Path, wanted: Callable[[str], bool] = lambda key: True
) -> dict[str, int | float | bool | str]:
    """The scalar and string metadata of a GGUF file (arrays skipped), read from its header alone.

    Only the keys `wanted` accepts are kept (the others are skipped, not
    read into memory). Not the `gguf` package: it pulls numpy into the
    serving process (12 MiB resident, issue 13's control-plane memory row)
    for a handful of integers. Raises ValueError for a file that is not a
    GGUF (version 2 or 3, little-endian), is cut short, or passes one of
    the bounds above; OSError when it cannot be read.
    """
    with path.open("rb") as raw:
        header = _Header(io.BufferedReader(raw, buffer_size=1 << 16), os.fstat(raw.fileno()).st_size)
        if header.number(_MAGIC) != b"GGUF":
            raise ValueError("not a GGUF file")
        if header.number(_U32) not in (2, 3):
            raise ValueError("an unsupported GGUF version")
        header.number(_U64)  # tensors
        keys = header.number(_U64)
        if keys > MAX_KEYS:
            raise ValueError(f"{keys} metadata keys")
        fields: dict[str, int | float | bool | str] = {}
        for _ in range(keys):
            key = header.string(MAX_KEY_BYTES)
            kind = header.number(_U32)
            keep = wanted(key)
            scalar = _SCALARS.get(kind)
            if scalar is not None:
                value = header.number(scalar)
                if keep:
                    fields[key] = value
            elif kind == _STRING:
                if keep:
                    fields[key] = header.string(MAX_STRING_BYTES)
                else:
                    header.skip_string()
            elif kind == _ARRAY:
                header.skip_array()
            else:
                raise ValueError(f"unknown value type {kind}")
        return fields
