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
import logging
import os
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from lemonade_grpc._gen.lemonade.v1 import inference_pb2, model_control_pb2
from lemonade_grpc._gen.lemonade.v1 import inference_pb2_grpc as inference_grpc
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2_grpc as control_grpc
from lemonade_grpc.api.inference import Inference
from lemonade_grpc.api.interceptors import MalformedRequestInterceptor
from lemonade_grpc.api.model_control import ModelControl
from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.backends.estimate import estimate_bytes
from lemonade_grpc.backends.registry import BackendRegistry
from lemonade_grpc.config import Config, builtin_catalog
from lemonade_grpc.pool.events import PoolWarning
from lemonade_grpc.pool.pool import Pool
from lemonade_grpc.pool.state import PinStore
from lemonade_grpc.provision.tiny_model import ensure_tiny_model

log = logging.getLogger("lemonade_grpc")

SERVICE_NAMES = (
    model_control_pb2.DESCRIPTOR.services_by_name["ModelControl"].full_name,
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
)


class ListenError(RuntimeError):
    """The listen address could not be bound."""


async def serve(config: Config) -> int:
    """Run the server until SIGINT or SIGTERM; return the process exit status."""
    if config.builtin_catalog:
        config = dataclasses.replace(config, models=builtin_catalog(ensure_tiny_model()))
    config.state_dir.mkdir(parents=True, exist_ok=True)
    registry = BackendRegistry(config.state_dir / "backends.json")
    stale = registry.reap_stale()
    pool = Pool(
        config.models,
        config.pool,
        functools.partial(Backend.start, log_dir=config.state_dir / "logs", registry=registry),
        pin_store=PinStore(config.state_dir / "pins.json"),
        estimate=estimate_bytes,
    )
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
    # SO_REUSEPORT is on by default on Linux: a second server would silently
    # share the port with the first and get half of its calls.
    server = grpc.aio.server(interceptors=[MalformedRequestInterceptor()], options=[("grpc.so_reuseport", 0)])
    control_grpc.add_ModelControlServicer_to_server(ModelControl(pool), server)
    inference_grpc.add_InferenceServicer_to_server(Inference(pool), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, reflection.SERVICE_NAME, health.SERVICE_NAME), server
    )
    try:
        port = server.add_insecure_port(config.listen)
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
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)

    await server.start()
    try:
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        host = config.listen.rpartition(":")[0]
        log.info("listening on %s:%d (catalog: %s)", host, port, ", ".join(sorted(config.models)))
        pool.start()  # after listening: Status and Watch show the pins being restored
        await stop.wait()
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(config.shutdown_grace_seconds)
        await pool.shutdown()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
    log.info("stopped")
    return 0
