"""The client commands of the CLI, against a real server: what an operator types."""

from __future__ import annotations

import asyncio
import json
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

    code, out, _ = await cli(server.address, "status")
    [model] = json.loads(out)["pool"]["models"]
    assert (model["name"], model["pinned"], model["options"]["ctx_size"]) == ("tiny", True, 1024)

    code, out, _ = await cli(server.address, "unload", "tiny")
    assert code == 0
    code, out, _ = await cli(server.address, "status")
    assert json.loads(out)["pool"]["models"] == []


async def test_errors_print_code_and_reason_and_exit_non_zero(servers: ServerFactory) -> None:
    server = servers.start()
    code, _, err = await cli(server.address, "chat", "nope", "hi")
    assert code != 0
    assert "NOT_FOUND MODEL_NOT_FOUND" in err
