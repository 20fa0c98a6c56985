"""The server under test: its catalog, slots and config, started on the harness.

The bundled tiny model on the real llama-server and four fake
OpenAI-compatible backends (tests/fake_backend.py, run as a file through
the `command` recipe), with fewer slots than models so that loads evict;
the server started by `lemonade_grpc.testing.launch` (tagged, on a free
port), or under bench/traced_server.py for `--tracemalloc`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil

from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.testing import ServerDidNotStart, ServerProcess, launch, serve_command

ROOT = Path(__file__).resolve().parents[2]
TRACED_SERVER = ROOT / "bench" / "traced_server.py"
FAKE_BACKEND = ROOT / "tests" / "fake_backend.py"

# Slots per type, and the models competing for them.
SLOTS = {"llm": 2, "embedding": 1}
FAKES = {
    # name: (type, extra fake_backend flags)
    "fa": ("llm", ["--load-seconds", "0.2", "--token-seconds", "0.01"]),
    "fb": ("llm", ["--load-seconds", "0.5", "--token-seconds", "0.02"]),
    "fc": ("llm", ["--load-seconds", "1.0", "--token-seconds", "0.005"]),
    "emb": ("embedding", ["--load-seconds", "0.2", "--token-seconds", "0.01"]),
}
MODELS = ("tiny", *FAKES)
TYPE_OF = {"tiny": "llm"} | {name: kind for name, (kind, _) in FAKES.items()}
SLOT_TYPE = {pb.MODEL_TYPE_LLM: "llm", pb.MODEL_TYPE_EMBEDDING: "embedding"}

CONFIG = """\
[server]
shutdown_grace_seconds = 2

[pool]
max_loaded = {{ llm = {llm}, embedding = {embedding} }}
idle_unload_seconds = 0
evict_grace_seconds = 1
stop_grace_seconds = 1
health_timeout_seconds = 15
health_check_seconds = 1
health_check_timeout_seconds = 2
health_check_failures = 3
restart_backoff_seconds = 0.5
restart_backoff_max_seconds = 4
max_restarts = 10
restart_window_seconds = 60
memory_check_seconds = 1
memory_reserve_mb = {reserve}

[limits]
max_streams = 24
max_streams_per_model = 8
max_queued_streams = 16
max_queued_loads = 16
watch_queue_events = 128
max_watch_streams = 64
"""


def write_config(workdir: Path, tiny: Path, memory_headroom_mb: int | None) -> Path:
    reserve = 0
    if memory_headroom_mb is not None:
        reserve = max(0, (psutil.virtual_memory().available >> 20) - memory_headroom_mb)
    text = CONFIG.format(llm=SLOTS["llm"], embedding=SLOTS["embedding"], reserve=reserve)
    text += (
        f'\n[models.tiny]\nrecipe = "llamacpp"\npath = "{tiny}"\nctx_size = 256\nargs = ["--threads", "1"]\n'
    )
    for name, (kind, flags) in FAKES.items():
        model_file = workdir / f"{name}.bin"  # the fake only checks that it exists; its name says which
        model_file.write_bytes(b"fake model\n")
        command = [sys.executable, str(FAKE_BACKEND), "--port", "{port}", "--model", "{path}", *flags]
        text += (
            f'\n[models.{name}]\nrecipe = "command"\npath = "{model_file}"\ntype = "{kind}"\n'
            f"ctx_size = 256\ncommand = {json.dumps(command)}\n"
        )
    path = workdir / "soak.toml"
    path.write_text(text)
    return path


def start_server(workdir: Path, config: Path, traced: Path | None = None) -> ServerProcess:
    """The server under test; with `traced`, under `traced_server.py` (tracemalloc snapshots there)."""
    state_dir = workdir / "state"
    python = (
        (sys.executable, "-m", "lemonade_grpc")
        if traced is None
        else (sys.executable, str(TRACED_SERVER), str(traced))
    )
    command = serve_command(state_dir, "--config", str(config), python=python)
    try:
        return launch(command, workdir / "server.log", state_dir, cwd=ROOT)
    except ServerDidNotStart as error:
        raise SystemExit(str(error)) from None
