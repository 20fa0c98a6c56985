"""Telling a harness's processes apart: a tag in their environment, which backends inherit."""

from __future__ import annotations

import contextlib
import platform
import signal
from pathlib import Path

import psutil

# Every server the harness starts carries a unique value of this variable; its backends inherit it.
TAG_VAR = "LEMONADE_TEST_TAG"


def is_gone(pid: int) -> bool:
    """Whether `pid` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def tagged_processes(tags: set[str]) -> list[psutil.Process]:
    """Live processes whose environment carries one of `tags`."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(TAG_VAR) in tags and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            continue
    return found


def kill_tagged(tags: set[str]) -> list[str]:
    """SIGKILL every live process carrying one of `tags` (a stopped one is woken first); what was killed."""
    killed = []
    for process in tagged_processes(tags):
        with contextlib.suppress(psutil.Error):
            killed.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
            process.send_signal(signal.SIGCONT)
            process.kill()
    return killed


def cpu_model() -> str:
    """The machine's CPU, for a benchmark's report."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()
