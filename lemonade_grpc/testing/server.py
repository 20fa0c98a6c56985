"""A `lemonade-grpc serve` process on a free loopback port, its address read from its log."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lemonade_grpc.testing.processes import TAG_VAR, kill_tagged

# The line the server logs once it serves (`server.py`): the address it bound.
LISTENING = re.compile(rb"listening on ([0-9.]+):(\d+)")
START_SECONDS = 60.0


class ServerDidNotStart(RuntimeError):
    """The server exited, or did not listen in time; the message holds its log."""


def serve_command(
    state_dir: Path, *args: str, python: Sequence[str] = (sys.executable, "-m", "lemonade_grpc")
) -> list[str]:
    """`python serve` on a free loopback port and `state_dir`, then `args`.

    `python`: how to run the package (another checkout's, or a wrapper such
    as `bench/traced_server.py`).
    """
    return [*python, "serve", "--listen", "127.0.0.1:0", "--state-dir", str(state_dir), *args]


@dataclass
class ServerProcess:
    """A server the harness started: its process, address, log, state directory and tag."""

    process: subprocess.Popen[bytes]
    address: str
    log_path: Path
    state_dir: Path
    tag: str

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, seconds: float = 30.0) -> int:
        """Signal the server and wait for it to exit; return its exit status.

        Raises `TimeoutError` (after killing it) when it does not exit within `seconds`.
        """
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            message = f"server did not exit within {seconds:g} s of signal {sig}:\n{self.log()}"
            raise TimeoutError(message) from None

    def kill_everything(self) -> list[str]:
        """Last resort: SIGKILL the server and anything carrying its tag; what had to be killed."""
        killed = []
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            killed.append(f"server {self.process.pid}")
        return killed + kill_tagged({self.tag})


def launch(
    command: Sequence[str],
    log_path: Path,
    state_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    seconds: float = START_SECONDS,
) -> ServerProcess:
    """Run `command` (see `serve_command`), output to `log_path`, tagged; return it once it listens.

    `env` adds to (or overrides) this process's environment; `cwd`: a
    checkout to run from (`python -m` imports from there first). Raises
    `ServerDidNotStart`, the process killed, when it exits or does not
    listen within `seconds`.
    """
    tag = uuid.uuid4().hex
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {}), TAG_VAR: tag},
        )
    deadline = time.monotonic() + seconds
    while not (match := LISTENING.search(log_path.read_bytes())):
        exited = process.poll() is not None
        if exited or time.monotonic() > deadline:
            what = f"exited with {process.returncode}" if exited else f"did not listen within {seconds:g} s"
            process.kill()
            process.wait()
            raise ServerDidNotStart(f"server {what}:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.02)
    address = f"{match.group(1).decode()}:{match.group(2).decode()}"
    return ServerProcess(process, address, log_path, state_dir, tag)
