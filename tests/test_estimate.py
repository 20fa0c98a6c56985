"""The memory estimate's GGUF header reader: the same metadata as the `gguf` package, no numpy.

The serving process reads a model's header before each load; the `gguf`
package would pull numpy into it (issue 13's memory row), so it reads the
header itself. The package stays the reference here.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from lemonade_grpc.backends.estimate import kv_bytes_per_cell, read_metadata


def reference(path: Path) -> dict[str, object]:
    """Scalar and string metadata as the `gguf` package reads it."""
    reader = gguf.GGUFReader(path, "r")
    found: dict[str, object] = {}
    for name, field in reader.fields.items():
        value = field.contents()
        if isinstance(value, int | float | str) and not name.startswith("GGUF."):
            found[name] = value
    return found


def test_the_header_reads_as_the_gguf_package_reads_it(tiny_model: Path) -> None:
    ours = read_metadata(tiny_model)
    theirs = reference(tiny_model)
    assert ours == pytest.approx(theirs)
    assert ours["general.architecture"] == "llama"
    # 2 layers x 4 KV heads x (16 + 16) values x 2 bytes (f16).
    assert kv_bytes_per_cell(tiny_model, tiny_model.stat().st_mtime) == 2 * 4 * 32 * 2


def test_the_serving_process_does_not_load_numpy() -> None:
    code = (
        "import sys, lemonade_grpc.server, lemonade_grpc.backends.estimate as e, pathlib;"
        "from lemonade_grpc.provision.tiny_model import ensure_tiny_model;"
        "p = ensure_tiny_model(); e.kv_bytes_per_cell(p, p.stat().st_mtime);"
        "print(sorted({'numpy', 'gguf'} & set(sys.modules)))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"GGML" + data[4:],  # not a GGUF
        lambda data: data[:4] + struct.pack("<I", 99) + data[8:],  # a version we do not know
        lambda data: data[:40],  # cut short
        lambda data: data[:16] + struct.pack("<Q", 1 << 40) + data[24:],  # a key count from nowhere
        lambda data: data[:24] + struct.pack("<Q", 1 << 60) + data[32:],  # a first key of 2^60 bytes
    ],
    ids=["magic", "version", "truncated", "key-count", "key-length"],
)
def test_a_damaged_header_is_a_value_error_and_the_estimate_falls_back_to_the_size(
    tiny_model: Path, tmp_path: Path, damage: object
) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(damage(tiny_model.read_bytes()[:4096]))  # type: ignore[operator]
    with pytest.raises(ValueError):  # noqa: PT011 - each damage has its own message
        read_metadata(broken)
    assert kv_bytes_per_cell(broken, broken.stat().st_mtime) == 0
