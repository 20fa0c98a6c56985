"""Programs run in fresh interpreters, alternating, their two printed numbers reduced to medians.

A library of the import benches (`config_import.py`, `http_import.py`):
each round runs every program once, in a new process, the order reversed
every other round so that none always runs on a warmer machine.
"""

from __future__ import annotations

import statistics
import subprocess
from collections.abc import Mapping


def medians(python: str, programs: Mapping[str, str], rounds: int) -> dict[str, tuple[float, float]]:
    """Run each of `programs` (name -> code printing two numbers) `rounds` times; the medians of each."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in programs}
    for index in range(rounds):
        order = list(programs.items())
        for name, code in order if index % 2 == 0 else reversed(order):
            first, second = subprocess.run(
                [python, "-c", code], capture_output=True, text=True, check=True
            ).stdout.split()
            runs[name].append((float(first), float(second)))
    return {
        name: (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs))
        for name, pairs in runs.items()
    }
