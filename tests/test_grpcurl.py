"""grpcurl as ops use it: the README's recipes, run as written (address aside) by the real binary.

The commands come from the README itself (the `sh` block under "Using it
with grpcurl", and the failed call shown after it), so the README cannot
drift from what works. Each is checked for what its comment promises.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import ServerFactory
from lemonade_grpc.testing import ServerProcess as Server

README = Path(__file__).resolve().parent.parent / "README.md"
README_ADDRESS = "localhost:50051"
# A check fails by assertion or by returning False.
Check = Callable[[list[dict[str, Any]], str], object]


@pytest.fixture(scope="session")
def grpcurl() -> Path:
    candidates = [os.environ.get("LEMONADE_GRPCURL", "")]
    candidates += sorted(str(p) for p in Path.home().glob(".cache/lemonade-grpc/grpcurl-*/grpcurl"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.fail("grpcurl not found: `make setup` installs it (or set LEMONADE_GRPCURL)")


def recipes() -> list[tuple[str, str]]:
    """(comment, command) of each grpcurl command in the README's recipe block, continuations joined.

    A command continues on the next line after a backslash, or while a
    quoted argument (a JSON request written over several lines) is open.
    """
    text = README.read_text()
    block = text.split("## Using it with grpcurl", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    found: list[tuple[str, str]] = []
    comment = ""
    open_command = ""
    for line in block.replace("\\\n", " ").splitlines():
        line = line.strip()
        if open_command:
            line = f"{open_command} {line}"
        elif line.startswith("#"):
            comment = line.lstrip("# ")
            continue
        if line.startswith("grpcurl "):
            open_command = line if line.count("'") % 2 else ""
            if not open_command:
                found.append((comment, line))
    return found


def failed_call() -> tuple[str, str]:
    """The failed call the README shows: its command and the output it shows."""
    text = README.read_text().split("## Using it with grpcurl", 1)[1]
    shown = text.split("```\n$ ", 1)[1].split("```", 1)[0]
    command, _, output = shown.replace("\\\n", " ").partition("\n")
    return " ".join(command.split()), output


def run(grpcurl: Path, server: Server, command: str, *, first: int | None = None) -> tuple[int, str, str]:
    """Run `command` (a README line) against `server`; with `first`, stop after that many messages."""
    argv = shlex.split(command.replace(README_ADDRESS, server.address))
    assert argv[0] == "grpcurl"
    process = subprocess.Popen(
        [str(grpcurl), *argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if first is None:
        out, err = process.communicate(timeout=120)
        return process.returncode, out, err
    assert process.stdout is not None
    out = ""
    try:
        while len(messages(out)) < first:
            line = process.stdout.readline()
            if not line:
                break
            out += line
    finally:
        process.kill()
        _, err = process.communicate(timeout=30)
    return 0, out, err


def messages(out: str) -> list[dict[str, Any]]:
    """The JSON messages grpcurl printed, one after another."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    index = 0
    while True:
        while index < len(out) and out[index].isspace():
            index += 1
        if index >= len(out):
            return found
        try:
            message, index = decoder.raw_decode(out, index)
        except json.JSONDecodeError:
            return found  # a message still being printed
        found.append(message)


def ready(ctx_size: int | None = None) -> Check:
    """A Load's progress: QUEUED first (unless it was loaded already), READY last, with `ctx_size`."""

    def check(found: list[dict[str, Any]], out: str) -> None:
        assert found[0]["phase"] == "LOAD_PHASE_QUEUED" or found[-1].get("already_loaded"), found[0]
        assert found[-1]["phase"] == "LOAD_PHASE_READY"
        if ctx_size is not None:
            assert found[-1]["status"]["options"]["ctx_size"] == ctx_size

    return check


def ended(found: list[dict[str, Any]], out: str) -> None:
    assert found[-1]["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP")
    assert found[-1]["usage"]["completion_tokens"] >= 1


def says_paris(found: list[dict[str, Any]], out: str) -> bool:
    """A chat that ended, and SmolLM2's answer: the capital of France is Paris."""
    ended(found, out)
    return "Paris" in "".join(m.get("text", "") for m in found)


def weather_json(found: list[dict[str, Any]], out: str) -> bool:
    """The answer is JSON with the schema's fields (the grammar made from the schema allows nothing else)."""
    ended(found, out)
    answer = json.loads("".join(m.get("text", "") for m in found))
    return sorted(answer) == ["city", "temperature_c"] and isinstance(answer["temperature_c"], int)


def two_vectors_of_576(found: list[dict[str, Any]], out: str) -> bool:
    return found[0]["dimension"] == 576 and [len(e["values"]) for e in found[0]["embeddings"]] == [576, 576]


# What each recipe must show, by its method (and, for Load, its options); the
# Watch recipes stream for ever: they are read for `first` messages.
CHECKS: dict[str, tuple[int | None, Check]] = {
    "list": (None, lambda f, out: set(out.split()) >= {"lemonade.v1.ModelControl", "lemonade.v1.Inference"}),
    "describe": (None, lambda f, out: "rpc Load ( .lemonade.v1.LoadRequest )" in out),
    "grpc.health.v1.Health/Check": (None, lambda f, out: f == [{"status": "SERVING"}]),
    "ListModels": (
        None,
        lambda f, out: sorted(m["name"] for m in f[0]["models"]) == ["smollm2", "smollm2-embed", "tiny"],
    ),
    "Plan": (
        None,
        lambda f, out: f[0]["outcome"] == "PLAN_OUTCOME_LOAD" and f[0]["options"]["ctx_size"] == 2048,
    ),
    "Load": (None, ready()),
    "Load ctx_size": (None, ready(2048)),
    "Complete": (None, ended),
    "Chat": (None, says_paris),
    "Chat response_format": (None, weather_json),
    "Embed": (None, two_vectors_of_576),
    "Tokenize": (None, lambda f, out: f == [{"ids": [19556, 905]}]),
    "Status": (None, lambda f, out: [m["name"] for m in f[0]["pool"]["models"]] == ["tiny"]),
    "Pin": (None, lambda f, out: f[0]["status"]["pinned"] is True),
    "Watch": (1, lambda f, out: "snapshot" in f[0]),
    "Watch since_sequence": (3, lambda f, out: "snapshot" not in f[0] and len(f) == 3),
    "Unload": (None, lambda f, out: f[0].get("unloaded") in (["tiny"], None)),
}


def check_key(command: str) -> str:
    if " list" in command:
        return "list"
    if " describe " in command:
        return "describe"
    method = command.split()[-1].rsplit("/", 1)[-1]
    if "Health" in command:
        return "grpc.health.v1.Health/Check"
    if method == "Chat" and "response_format" in command:
        return "Chat response_format"
    if method in ("Load", "Watch") and ("ctx_size" in command or "since_sequence" in command):
        return f"{method} {'ctx_size' if method == 'Load' else 'since_sequence'}"
    return method


def test_the_readme_recipes_do_what_their_comments_say(
    servers: ServerFactory, grpcurl: Path, smollm2_model: Path
) -> None:
    server = servers.start()
    found = recipes()
    assert len(found) >= 14, f"the README's recipe block was not found whole: {found}"
    seen = set()
    for comment, command in found:
        key = check_key(command)
        first, check = CHECKS[key]
        code, out, err = run(grpcurl, server, command, first=first)
        assert code == 0, f"{command} ({comment}) exited {code}: {err}"
        result = check(messages(out), out)
        assert result is None or result, f"{command} ({comment}) printed:\n{out[:2000]}"
        seen.add(key)
    assert seen == set(CHECKS), f"recipes not in the README: {set(CHECKS) - seen}"


def test_the_readme_failed_call_shows_its_error_info(servers: ServerFactory, grpcurl: Path) -> None:
    server = servers.start()
    command, shown = failed_call()
    code, _, err = run(grpcurl, server, command)
    assert code != 0
    # The README shows the details folded onto one line each; grpcurl indents them.
    compact = re.sub(r"\s+", " ", err)
    for line in shown.splitlines():
        line = line.strip()
        if line.startswith(("Code:", "Message:")):
            assert line in err, f"the README shows {line!r}; grpcurl printed:\n{err}"
    assert '"reason": "INVALID_REQUEST"' in compact
    assert '"@type": "type.googleapis.com/google.rpc.BadRequest"' in compact
    assert '"field": "max_tokens"' in compact
