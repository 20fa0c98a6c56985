"""Per-user directories: the build/model cache and the state directory."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "lemonade-grpc"


def cache_root() -> Path:
    """Cache shared by every checkout of this user (``$LEMONADE_GRPC_CACHE_DIR`` overrides)."""
    override = os.environ.get("LEMONADE_GRPC_CACHE_DIR")
    return Path(override) if override else platformdirs.user_cache_path(APP)


def default_state_dir() -> Path:
    """Where pins and the live-backend record are kept unless ``--state-dir`` says otherwise."""
    return platformdirs.user_state_path(APP)
