"""Persisted pins: which models to load again at boot, and with which options.

One JSON file in the state directory (DESIGN.md item 5, Lemonade #2310):

    {"version": 1, "pinned": {"tiny": {"ctx_size": 512, "idle_unload_seconds": null,
                                       "backend_args": []}}}

The pool writes it, atomically, each time the set of pinned models or their
options changes: after a pinned load succeeded (never before, so a model that
fails to load is not retried at every boot) and at once on unpin. Entries
keep the order in which the models were pinned, which is the order they are
restored in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lemonade_grpc.core import bounds
from lemonade_grpc.core.options import EffectiveOptions
from lemonade_grpc.store.files import write_atomically

VERSION = 1


class StateCorrupt(ValueError):
    """The state file does not hold what this version writes."""


class PinFile:
    """The pin file of one state directory. Loop thread only."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> tuple[dict[str, EffectiveOptions], str | None]:
        """The saved pins, and a problem when the file could not be used.

        A missing file is no pins and no problem. An unreadable or corrupt
        one never stops the server: it is moved aside (kept for a human to
        look at) and the problem says where to.
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}, None
        except (OSError, UnicodeDecodeError) as error:
            problem = f"cannot read {self.path}: {error}"
        else:
            try:
                return decode(text), None
            except StateCorrupt as error:
                problem = f"{self.path} is corrupt: {error}"
        return {}, f"{problem}; {self._move_aside()}; starting with no pins"

    def write(self, pins: Mapping[str, EffectiveOptions]) -> None:
        """Replace the file with `pins`. Raises OSError when it cannot be written."""
        write_atomically(self.path, encode(pins))

    def _move_aside(self) -> str:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            self.path.replace(aside)
        except OSError as error:
            return f"could not move it aside ({error})"
        return f"moved it to {aside}"


def encode(pins: Mapping[str, EffectiveOptions]) -> str:
    """The file's text for `pins`. Pure."""
    pinned = {
        name: {
            "ctx_size": options.ctx_size,
            "idle_unload_seconds": options.idle_unload_seconds,
            "backend_args": list(options.backend_args),
        }
        for name, options in pins.items()
    }
    return json.dumps({"version": VERSION, "pinned": pinned}, indent=2) + "\n"


def decode(text: str) -> dict[str, EffectiveOptions]:
    """The pins in the file's `text`; raises `StateCorrupt` saying what is wrong. Pure."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deep
        raise StateCorrupt(f"not JSON ({bounds.echo(str(error))})") from None
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise StateCorrupt(f"expected an object with version {VERSION}")
    pinned = data.get("pinned")
    if not isinstance(pinned, dict):
        raise StateCorrupt("'pinned' must be an object")
    for name in pinned:
        problem = bounds.model_name_problem(name)
        if problem is not None:
            raise StateCorrupt(f"pinned: the model name {problem}")
    return {name: _options(name, entry) for name, entry in pinned.items()}


def _options(name: str, entry: Any) -> EffectiveOptions:
    # The same bounds as a request's: a file that decodes but holds what no
    # request could ask for is corrupt, moved aside, never a boot failure
    # (issue #9 finding 18: ctx_size > 2^24 made `serve` fail at every boot).
    if not isinstance(entry, dict):
        raise StateCorrupt(f"pinned.{name} must be an object")
    ctx_size = entry.get("ctx_size")
    idle = entry.get("idle_unload_seconds")
    args = entry.get("backend_args")
    if not isinstance(ctx_size, int) or ctx_size not in bounds.CTX_SIZE:
        raise StateCorrupt(f"pinned.{name}.ctx_size must be an integer in {bounds.CTX_SIZE}")
    if idle is not None and (not isinstance(idle, int) or idle not in bounds.IDLE_UNLOAD_SECONDS):
        raise StateCorrupt(
            f"pinned.{name}.idle_unload_seconds must be null or an integer in {bounds.IDLE_UNLOAD_SECONDS}"
        )
    if (
        not isinstance(args, list)
        or not all(isinstance(a, str) for a in args)
        or len(args) > bounds.BACKEND_ARGS_COUNT
    ):
        raise StateCorrupt(
            f"pinned.{name}.backend_args must be a list of at most {bounds.BACKEND_ARGS_COUNT} strings"
        )
    return EffectiveOptions(ctx_size=ctx_size, idle_unload_seconds=idle, backend_args=tuple(args))
