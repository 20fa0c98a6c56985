"""GGUF metadata read from a file's header alone, within bounds a hostile header cannot pass.

What the memory estimate, the catalog (an embedding model's pooling) and a
model's capabilities read from a model file. Raises nothing but OSError and
ValueError (issue 18 finding 9).
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
