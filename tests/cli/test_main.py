"""The client commands of the CLI, against a real server: what an operator types."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import subprocess
import sys

from conftest import ServerFactory


async def cli(address: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "lemonade_grpc", *args, "--address", address),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_load_chat_complete_pin_status_unload(servers: ServerFactory) -> None:
    server = servers.start()
    code, out, _ = await cli(server.address, "load", "tiny", "--ctx-size", "1024", "--pin")
    assert code == 0
    assert out.splitlines()[0] == "QUEUED"
    assert "READY" in out

    code, out, err = await cli(
        server.address, "chat", "tiny", "Hello", "--system", "Be brief", "--max-tokens", "12"
    )
    assert code == 0
    assert out.strip()
    assert "[length: 12 tokens" in err

    code, out, err = await cli(server.address, "complete", "tiny", "Once", "--max-tokens", "5", "--seed", "1")
    assert code == 0
    assert "[length: 5 tokens" in err

    code, out, _ = await cli(server.address, "status", "--json")
    [model] = json.loads(out)["pool"]["models"]
    assert (model["name"], model["pinned"], model["options"]["ctx_size"]) == ("tiny", True, 1024)

    code, out, _ = await cli(server.address, "unload", "tiny")
    assert code == 0
    code, out, _ = await cli(server.address, "status")
    assert out.strip() == "no models loaded"


async def test_errors_print_code_and_reason_and_exit_non_zero(servers: ServerFactory) -> None:
    server = servers.start()
    code, _, err = await cli(server.address, "chat", "nope", "hi")
    assert code != 0
    assert "NOT_FOUND MODEL_NOT_FOUND" in err


async def test_status_is_a_table_for_people_and_json_for_machines(servers: ServerFactory) -> None:
    server = servers.start()
    await cli(server.address, "load", "tiny", "--pin")
    # --address before the subcommand works as well as after it.
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "lemonade_grpc", "--address", server.address, "status"),
        stdout=asyncio.subprocess.PIPE,
    )
    table, _ = await process.communicate()
    _, out, _ = await cli(server.address, "status", "--json")
    [model] = json.loads(out)["pool"]["models"]
    lines = table.decode().splitlines()
    assert process.returncode == 0
    assert lines[0].startswith("NAME  STATE  PINNED  PID")
    name, state, pinned, pid, *_ = lines[1].split()
    assert (name, state, pinned, int(pid)) == ("tiny", "ready", "yes", model["pid"])
    assert lines[1].endswith("never (pinned)")
    assert "\x1b[" not in table.decode(), "colours written to a pipe"


def in_terminal(*args: str) -> str:
    """Run the CLI with a pseudo-terminal as its stdout; what it wrote there."""
    main, child = pty.openpty()
    try:
        process = subprocess.run(
            [sys.executable, "-m", "lemonade_grpc", *args],
            stdout=child,
            stderr=subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if k != "NO_COLOR"},
            timeout=60,
            check=True,
        )
        assert process.returncode == 0
        os.close(child)
        child = -1
        output = b""
        with contextlib.suppress(OSError):  # EIO once everything is read
            while chunk := os.read(main, 65536):
                output += chunk
        return output.decode()
    finally:
        os.close(main)
        if child >= 0:
            os.close(child)


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


async def test_in_a_terminal_load_rewrites_one_line_and_status_has_colours(servers: ServerFactory) -> None:
    # What tmux showed (capture-pane -e, 100x20), after `load tiny --pin && status`:
    #   READY 100% ready
    #   tiny loaded: pid 25570, port 52953
    #   NAME  STATE  PINNED  PID    MEMORY  IN FLIGHT  IDLE UNLOAD IN
    #   tiny  ^[[32mready^[[39m  yes     25570  19 MiB  0          never (pinned)
    server = servers.start()
    loaded = await asyncio.to_thread(in_terminal, "load", "tiny", "--pin", "--address", server.address)
    table = await asyncio.to_thread(in_terminal, "status", "--address", server.address)
    # Every phase rewrites the line in place ("\r" + erase line); the first
    # newline comes after READY. (The terminal writes "\n" as "\r\n".)
    text = loaded.replace("\r\n", "\n")
    updates = [ANSI.sub("", part) for part in text.split("\r") if part]
    assert updates[0].startswith("QUEUED")
    # Each phase with a progress bar: `LOADING   [..........]   --  backend pid 123: ...`.
    assert any(update.startswith("LOADING") and " [" in update for update in updates), updates
    assert all("\n" not in update for update in updates[:-1]), updates
    assert updates[-1].startswith("READY")
    assert "\ntiny loaded: pid " in updates[-1]
    assert text.count("\n") == 2
    assert "\x1b[32mready\x1b[0m" in table
