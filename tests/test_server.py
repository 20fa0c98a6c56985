"""The server process: health, reflection, shutdown, and the CLI's config errors."""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import Server, ServerFactory, eventually, is_gone, next_message
from lemonade_grpc import server as server_module
from lemonade_grpc._gen.lemonade.v1 import inference_pb2, inference_pb2_grpc, model_control_pb2_grpc
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from rpc_errors import error_info


async def test_health_reports_serving_for_server_and_services(channel: grpc.aio.Channel) -> None:
    # typeshed's stubs for these generated stubs declare no methods: Any it is.
    health: Any = health_pb2_grpc.HealthStub(channel)
    for service in ("", "lemonade.v1.ModelControl", "lemonade.v1.Inference"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_both_services(channel: grpc.aio.Channel) -> None:
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    names: set[str] = set()
    async for response in stub.ServerReflectionInfo(iter([request])):
        names |= {s.name for s in response.list_services_response.service}
    assert {"lemonade.v1.ModelControl", "lemonade.v1.Inference", "grpc.health.v1.Health"} <= names
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names

    # The v1 protocol (what current tools try first) answers the same, its
    # messages being v1alpha's on the wire; and it describes itself.
    v1: Any = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    asked = [
        reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString(),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection"
        ).SerializeToString(),
    ]
    answers = [reflection_pb2.ServerReflectionResponse.FromString(raw) async for raw in v1(iter(asked))]
    assert {s.name for s in answers[0].list_services_response.service} == names
    [file] = answers[1].file_descriptor_response.file_descriptor_proto
    assert b"grpc.reflection.v1" in file
    with pytest.raises(grpc.aio.AioRpcError) as malformed:
        [raw async for raw in v1(iter([b"\xff\xff\xff"]))]
    assert error_info(malformed.value).reason == "MALFORMED_REQUEST"

    # grpcurl also needs the file descriptors behind a symbol to describe it.
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="lemonade.v1.ModelControl")
    async for response in stub.ServerReflectionInfo(iter([request])):
        assert response.file_descriptor_response.file_descriptor_proto, response


async def test_sigterm_stops_every_backend_and_exits_zero(servers: ServerFactory) -> None:
    server = servers.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        control = model_control_pb2_grpc.ModelControlStub(channel)
        ready = [r async for r in control.Load(pb.LoadRequest(model="tiny"))][-1]
    pid = ready.status.pid
    assert "llama-server" in " ".join(psutil.Process(pid).cmdline())

    assert server.stop(signal.SIGTERM) == 0
    await eventually(lambda: is_gone(pid), 5, f"backend pid {pid} to exit")
    # The pool stopped it, not the kernel's parent-death signal after we exited.
    assert f"tiny: unloaded (shutdown), pid {pid}" in server.log()


async def test_second_sigterm_forces_exit_and_kills_backends(servers: ServerFactory) -> None:
    server = servers.start("[server]\nshutdown_grace_seconds = 60\n")
    async with grpc.aio.insecure_channel(server.address) as channel:
        stream = inference_pb2_grpc.InferenceStub(channel).Complete(
            inference_pb2.CompleteRequest(model="tiny", prompt="x", max_tokens=1 << 20, ignore_eos=True)
        )
        await next_message(stream)  # generating: graceful shutdown would wait up to 60 s for it
        pid = (
            (await model_control_pb2_grpc.ModelControlStub(channel).Status(pb.StatusRequest()))
            .pool.models[0]
            .pid
        )
        server.process.send_signal(signal.SIGTERM)
        await eventually(lambda: "SIGTERM: shutting down" in server.log(), 10, "the first SIGTERM to be seen")
        assert server.stop(signal.SIGTERM, seconds=10) == 128 + signal.SIGTERM
        stream.cancel()
    await eventually(lambda: is_gone(pid), 5, f"backend pid {pid} to exit")


async def test_sigint_with_nothing_loaded_exits_zero(server: Server) -> None:
    assert server.stop(signal.SIGINT) == 0


def run_serve(tmp_path: Path, config: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.toml"
    path.write_text(config)
    command = [sys.executable, "-m", "lemonade_grpc", "serve", "--config", str(path), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ('[models.tiny]\npath = "tiny.gguf"\nctx_size = -5\n', "models.tiny.ctx_size"),
        ('[models.tiny]\npath = "tiny.gguf"\nctx_sise = 512\n', "models.tiny.ctx_sise"),
        ('[models.tiny]\npath = "missing.gguf"\n', "models.tiny.path"),
        ('[models.tiny]\npath = "tiny.gguf"\nrecipe = "vllm"\n', "models.tiny.recipe"),
        ('[models.x]\npath = "tiny.gguf"\nrecipe = "command"\ncommand = ["srv"]\n', "models.x.command"),
        ("[pool]\nmax_loaded = { llm = 0 }\n", "pool.max_loaded.llm"),
        ("[pool]\nmax_loaded = { gpu = 1 }\n", "pool.max_loaded.gpu"),
        ('[server]\nlisten = "nowhere"\n', "server.listen"),
        ("[pool\n", "config"),
    ],
)
def test_bad_config_exits_2_naming_the_field(tmp_path: Path, config: str, field: str) -> None:
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    result = run_serve(tmp_path, config)
    assert result.returncode == 2, result.stderr
    assert f"config error: {field}:" in result.stderr


def test_port_in_use_exits_2(tmp_path: Path, server: Server) -> None:
    result = run_serve(tmp_path, "", "--listen", server.address)
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on {server.address}" in result.stderr


def test_the_server_collects_garbage_less_often_and_never_what_start_up_made() -> None:
    # Issue 13: full collections over 100,000 objects of 1,000 Watch streams set the delivery p99.
    threshold = gc.get_threshold()
    try:
        server_module.tune_gc()
        assert gc.get_threshold() == server_module.GC_THRESHOLD
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


async def test_finding_1_sighup_without_tls_keeps_the_server_and_its_streams(servers: ServerFactory) -> None:
    # Issue 18 finding 1: with no [tls], SIGHUP (systemd's ExecReload) killed the server, cut its streams
    # and left no "shutting down" line; systemd took it for a clean exit and did not restart it.
    server = servers.start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stream = inference_pb2_grpc.InferenceStub(channel).Complete(
            inference_pb2.CompleteRequest(model="tiny", prompt="x", max_tokens=1 << 20, ignore_eos=True)
        )
        await next_message(stream)
        for _ in range(2):  # a second reload is as harmless as the first
            server.process.send_signal(signal.SIGHUP)
            await eventually(lambda: "SIGHUP: reloading" in server.log(), 10, "the SIGHUP to be handled")
        await eventually(lambda: server.log().count("SIGHUP: reloading") == 2, 10, "the second SIGHUP")
        # The stream opened before the reloads still delivers, and new calls are served.
        await next_message(stream)
        status = await model_control_pb2_grpc.ModelControlStub(channel).Status(pb.StatusRequest())
        assert [m.name for m in status.pool.models] == ["tiny"]
        stream.cancel()
    assert server.process.poll() is None
    assert server.stop(signal.SIGTERM) == 0
