"""Helpers for tests that run a Pool or a Backend in this process over real backend processes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from conftest import BACKEND_OPTIONS, FAKE_BACKEND, launcher
from lemonade_grpc.core.catalog import ModelSpec, ModelType, Recipe
from lemonade_grpc.core.settings import PoolSettings
from lemonade_grpc.pool.model import ModelState
from lemonade_grpc.pool.pool import Pool

OPTIONS = BACKEND_OPTIONS
# The fake backend's command line, for a `shell_spec` script to exec (after its mischief).
FAKE = f"{sys.executable} {FAKE_BACKEND} --port {{port}} --model {{path}}"


def shell_spec(name: str, model: Path, script: str) -> ModelSpec:
    """A command-recipe model running `script` under sh; `{port}` and `{path}` are filled in."""
    return ModelSpec(name, Recipe.COMMAND, model, ModelType.LLM, OPTIONS, command=("sh", "-c", script))


def state_of(pool: Pool, name: str) -> ModelState | None:
    view = pool.model_view(name)
    return view.state if view is not None else None


def make_pool(tmp_path: Path, catalog: dict[str, ModelSpec], **settings: Any) -> Pool:
    """A pool of `catalog` with `settings` over the defaults here; the test appends it to `pools`."""
    values: dict[str, Any] = {
        "max_loaded": {ModelType.LLM: 2},
        "memory_reserve_mb": 0,
        "memory_check_seconds": 0,
        "evict_grace_seconds": 0,
        "stop_grace_seconds": 2.0,
    } | settings
    return Pool(catalog, PoolSettings(**values), launcher(tmp_path / "logs"), estimate=lambda spec, o: 1)
