"""Crash-safe file replacement: a crash between the write and the rename keeps the old state."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from conftest import ServerFactory, connect, fake_model, poll
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.core.options import EffectiveOptions
from lemonade_grpc.store.pin_file import decode
from over_grpc import PINS, ready, saved_pins

KILLED_BETWEEN_WRITE_AND_RENAME = """
import os, signal, sys
from pathlib import Path
from lemonade_grpc.core.options import EffectiveOptions
from lemonade_grpc.store.pin_file import PinFile

store = PinFile(Path(sys.argv[1]))
store.write({"a": EffectiveOptions(ctx_size=512, idle_unload_seconds=None, backend_args=())})
# Fault injection: the process dies after the new file is written and synced, before the rename.
os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
store.write({"b": EffectiveOptions(ctx_size=1024, idle_unload_seconds=None, backend_args=())})
"""


async def test_a_crash_between_write_and_rename_keeps_the_old_state(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    died = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED_BETWEEN_WRITE_AND_RENAME, str(state_dir / PINS)
    )
    assert await died.wait() == -signal.SIGKILL
    assert list(decode((state_dir / f".{PINS}.tmp").read_text())) == ["b"], "the new state was written"
    assert saved_pins(state_dir) == {
        "a": EffectiveOptions(ctx_size=512, idle_unload_seconds=None, backend_args=())
    }

    config = "[pool]\nmax_loaded = { llm = 2 }\n" + fake_model("a", tiny_model) + fake_model("b", tiny_model)
    server = servers.start(config, state_dir=state_dir)
    async with connect(server.address) as client:
        a = await poll(lambda: ready(client, "a"), 30, "a to be restored")
        status = await client.control.Status(pb.StatusRequest())
    assert a.pinned
    assert a.options.ctx_size == 512
    assert [m.name for m in status.pool.models] == ["a"]
