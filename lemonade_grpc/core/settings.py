"""The pool's limits and timings: the `[pool]`, `[limits]` and `[backend_logs]` tables of the config.

The defaults written here are the only ones: the config reads them from
these dataclasses, and each field's range is in `lemonade_grpc.core.bounds`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lemonade_grpc.core.catalog import ModelType


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """Pool limits and timings (the `[pool]` table of the config)."""

    max_loaded: Mapping[ModelType, int] = field(
        default_factory=lambda: {ModelType.LLM: 1, ModelType.EMBEDDING: 1}
    )
    idle_unload_seconds: int = 0  # 0 = never
    health_timeout_seconds: float = 120.0
    stop_grace_seconds: float = 5.0
    # How long requests still using a model being unloaded may run before
    # they are ended with MODEL_EVICTED.
    evict_grace_seconds: float = 10.0
    # Memory kept free for everything else on the host: a load must fit
    # above it, and falling below it evicts (MEMORY_PRESSURE).
    memory_reserve_mb: int = 512
    memory_check_seconds: float = 5.0  # 0 = no periodic check
    # A READY backend is asked GET /health every `health_check_seconds`,
    # each check given `health_check_timeout_seconds`; this many failures in
    # a row (or its exit, at once) is a crash. With the defaults a stopped
    # (SIGSTOP) backend is declared hung within about 8 s (issue #9 finding
    # 13: 31 s before). A check that fails while the backend is streaming
    # bytes to a request does not count: it is busy, not hung.
    health_check_seconds: float = 2.0  # 0 = exits only
    health_check_timeout_seconds: float = 2.0
    health_check_failures: int = 3
    # An idle backend (no request since the last GET, no failed check) is
    # asked GET /health only this often; the checks between read its process
    # state (a stopped process is seen at once). 0 = a GET every check.
    idle_health_check_seconds: float = 30.0
    # A crashed pinned model is restarted after base, 2 base, 4 base ... up
    # to the cap; more than `max_restarts` crashes within the window and it
    # stays down.
    restart_backoff_seconds: float = 1.0
    restart_backoff_max_seconds: float = 60.0
    max_restarts: int = 5
    restart_window_seconds: float = 600.0
    # How often a loading llama-server's progress is read and reported, at most.
    progress_seconds: float = 0.25

    def slots(self, model_type: ModelType) -> int:
        """How many models of `model_type` may be resident at once."""
        return self.max_loaded.get(model_type, 1)

    @property
    def memory_reserve_bytes(self) -> int:
        return self.memory_reserve_mb << 20


@dataclass(frozen=True, slots=True)
class Limits:
    """How much concurrent work the server takes on (the `[limits]` table of the config).

    Beyond the running limits work waits in a bounded queue; beyond the
    queue it is refused with RESOURCE_EXHAUSTED, reason OVERLOADED (issue #9
    finding 7: 1,100 concurrent streams ran the server out of file
    descriptors and were reported as backend crashes).
    """

    # Inference streams running at once, in all and per model. Each holds a
    # connection (a file descriptor) to its backend; llama-server runs a few
    # slots per model and queues the rest itself.
    max_streams: int = 256
    max_streams_per_model: int = 64
    # Streams waiting for one of those.
    max_queued_streams: int = 1024
    # Distinct loads waiting for the load lock (identical ones join).
    max_queued_loads: int = 64
    # Events a Watch subscriber may fall behind by before it is resynced.
    watch_queue_events: int = 1024
    # Watch streams open at once (each holds a queue of up to 4 MiB).
    max_watch_streams: int = 1024
    # grpc.health.v1.Health Watch streams open at once, counted apart: Health
    # is open to callers without a token (issue 18 finding 3).
    max_health_watch_streams: int = 256
    # Client connections at once; 0: the descriptor limit less what the
    # server keeps for its own work (`server.connection_limit`). A connection
    # that has not finished its handshake (TLS, HTTP/2 preface) within
    # `handshake_timeout_seconds` is closed: peers that connect and say
    # nothing cannot hold descriptors (issue 18 finding 5).
    max_connections: int = 0
    handshake_timeout_seconds: float = 10.0
    # After an inference stream's first message, at most one message per
    # this many milliseconds (0: every delta as soon as it arrives). The
    # deltas of the interval go out together; the first delta and the end
    # of a stream are never held back. Between messages the backend's
    # connection is not read at all, so the kernel gathers its per-token
    # writes into one read (issue 13: per-token wake-ups were most of the
    # proxy's cost on a 2-core machine).
    stream_interval_ms: float = 5.0


@dataclass(frozen=True, slots=True)
class BackendLogSettings:
    """How much disk the backends' logs may take (the `[backend_logs]` table of the config).

    Issue 18 finding 6: a backend logging 1.2 MiB/s filled a 16 MiB state
    filesystem, and then Pin and every Load failed STATE_WRITE_FAILED. The
    state files (pins.json, backends.json) need a few KiB; these bounds keep
    the logs from ever taking that room (`lemonade_grpc.backends.logfile`).
    """

    # `logs/MODEL.log` becomes `MODEL.log.1` (replacing the one before) when
    # it would pass this: a model's logs take at most twice this. 16 MiB is
    # days of llama-server's dozen lines per request.
    max_file_mb: int = 16
    # At each backend start, logs of models not running are deleted, oldest
    # first, down to this in all (a catalog of many models that each ran once).
    max_total_mb: int = 256
    # Backend output that would leave less than this free on the state
    # directory's filesystem is dropped (counted, and said in the log). A
    # host with less than this free is in trouble anyway; the state files
    # need a thousandth of it.
    min_free_mb: int = 64

    @property
    def max_file_bytes(self) -> int:
        return self.max_file_mb << 20

    @property
    def max_total_bytes(self) -> int:
        return self.max_total_mb << 20

    @property
    def min_free_bytes(self) -> int:
        return self.min_free_mb << 20


LogFormat = Literal["plain", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("plain", "json")


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """`[telemetry]`: the Prometheus endpoint (off by default) and the log format."""

    prometheus_listen: str | None = None
    log_format: LogFormat = "plain"


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """`[tls]`: the server's certificate and key, and the CA that signs client certificates."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None  # set: clients must present a certificate it signed
