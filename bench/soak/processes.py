"""The server's processes as seen from outside: its live backends, which model each runs, its resources."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import psutil

from soak.server import FAKES


@dataclasses.dataclass(frozen=True)
class Proc:
    pid: int
    created: float
    model: str


def model_of(process: psutil.Process) -> str:
    """Which catalog model a backend process runs, from its command line.

    "forking": a child between fork and exec still has the server's command line.
    """
    try:
        command = process.cmdline()
    except psutil.NoSuchProcess:  # gone (or a zombie) since the children were listed
        return "exiting"
    except psutil.Error:
        return "?"
    if not command:
        return "exiting"  # its memory is already released: a dying process
    if "--" in command and command[0].endswith("setpriv"):
        command = command[command.index("--") + 1 :]
    server = "lemonade_grpc" in command or any(part.endswith("traced_server.py") for part in command)
    if server and "serve" in command:
        return "forking"  # a copy of the server, between fork and exec
    if "--model" in command:
        stem = Path(command[command.index("--model") + 1]).stem
        return stem if stem in FAKES else "tiny"
    if any("llama-server" in part for part in command):
        return "tiny"
    return f"? {' '.join(command)[:80]}"


def live_backends(server_pid: int) -> dict[int, Proc]:
    """The server's live (not zombie) descendants."""
    found: dict[int, Proc] = {}
    try:
        children = psutil.Process(server_pid).children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        try:
            if child.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                continue
            found[child.pid] = Proc(child.pid, child.create_time(), model_of(child))
        except psutil.Error:
            continue
    return found


@dataclasses.dataclass(frozen=True)
class Resources:
    rss_bytes: int
    fds: int
    threads: int

    def __str__(self) -> str:
        return f"RSS {self.rss_bytes / 2**20:.1f} MiB, {self.fds} fds, {self.threads} threads"


def resources(pid: int) -> Resources:
    process = psutil.Process(pid)
    return Resources(process.memory_info().rss, len(os.listdir(f"/proc/{pid}/fd")), process.num_threads())
