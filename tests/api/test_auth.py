"""Tokens and roles: who may call what, checked in one interceptor; without tokens, loopback only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from conftest import ServerFactory, eventually, fake_model, poll
from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as ipb
from lemonade_grpc._gen.lemonade.v1 import inference_pb2_grpc, model_control_pb2_grpc
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.client import connect, error_details
from lemonade_grpc.config import ConfigError, Overrides, load
from lemonade_grpc.core import access
from lemonade_grpc.testing import ServerProcess as Server
from otlp_receiver import attributes, grpc_receiver
from rpc_errors import error_info

ADMIN = "admin-0123456789abcdef"
INFERENCE = "infer-0123456789abcdef"


def test_roles_by_method() -> None:
    assert access.required_role("/grpc.health.v1.Health/Check") is None
    assert access.required_role("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo") is None
    assert access.required_role("/lemonade.v1.Inference/Complete") is access.Role.INFERENCE
    assert access.required_role("/lemonade.v1.ModelControl/Watch") is access.Role.INFERENCE
    assert access.required_role("/lemonade.v1.ModelControl/Plan") is access.Role.INFERENCE
    assert access.required_role("/lemonade.v1.ModelControl/Load") is access.Role.ADMIN
    assert access.required_role("/lemonade.v1.ModelControl/Unknown") is access.Role.ADMIN
    tokens = access.Tokens(admin=(ADMIN.encode(),), inference=(INFERENCE.encode(),))
    assert tokens.role_of(ADMIN.encode()) is access.Role.ADMIN
    assert tokens.role_of(INFERENCE.encode()) is access.Role.INFERENCE
    assert tokens.role_of(b"") is None
    assert tokens.role_of(ADMIN.encode()[:-1]) is None
    assert access.parse_tokens("# rotated monthly\nfirst-token-aaaaaaaa\n\n  second-token-bbbbbbb  \n") == (
        "first-token-aaaaaaaa",
        "second-token-bbbbbbb",
    )


def test_a_remote_address_needs_tokens_or_an_explicit_insecure_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load(Overrides(listen="0.0.0.0:50051"), env={})
    assert "--insecure-allow-remote" in str(refused.value)
    assert (
        load(Overrides(listen="0.0.0.0:50051", insecure_allow_remote=True), env={}).listen == "0.0.0.0:50051"
    )
    assert load(Overrides(listen="[::1]:50051"), env={}).listen == "[::1]:50051"
    with_token = load(Overrides(listen="0.0.0.0:50051"), env={"LEMONADE_GRPC_ADMIN_TOKEN": ADMIN})
    assert with_token.tokens.admin == (ADMIN.encode(),)
    with pytest.raises(ConfigError) as short:
        load(Overrides(), env={"LEMONADE_GRPC_ADMIN_TOKEN": "short"})
    assert "short" not in str(short.value)  # a token is never echoed


def control(channel: grpc.aio.Channel) -> dict[str, Any]:
    """Every RPC of ours, as a call taking metadata."""
    stub = model_control_pb2_grpc.ModelControlStub(channel)
    inference = inference_pb2_grpc.InferenceStub(channel)

    async def first(call: Any) -> object:
        async for message in call:
            return message
        return None

    return {
        "Load": lambda md: first(stub.Load(pb.LoadRequest(model="m"), metadata=md)),
        "Unload": lambda md: stub.Unload(pb.UnloadRequest(model="m"), metadata=md),
        "Pin": lambda md: stub.Pin(pb.PinRequest(model="m", pinned=False), metadata=md),
        "Status": lambda md: stub.Status(pb.StatusRequest(), metadata=md),
        "ListModels": lambda md: stub.ListModels(pb.ListModelsRequest(), metadata=md),
        "Plan": lambda md: stub.Plan(pb.PlanRequest(model="m"), metadata=md),
        "Watch": lambda md: first(stub.Watch(pb.WatchRequest(), metadata=md)),
        "Complete": lambda md: first(
            inference.Complete(ipb.CompleteRequest(model="m", prompt="x", max_tokens=1), metadata=md)
        ),
        "Chat": lambda md: first(
            inference.Chat(
                ipb.ChatRequest(
                    model="m", messages=[ipb.ChatMessage(role="user", content="x")], max_tokens=1
                ),
                metadata=md,
            )
        ),
    }


async def outcome(call: Any, metadata: tuple[tuple[str, str], ...]) -> str:
    try:
        await call(metadata)
    except grpc.aio.AioRpcError as error:
        return f"{error.code().name} {error_info(error).reason}"
    return "OK"


async def test_tokens_and_roles_over_grpc(servers: ServerFactory, tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text(f"# admins\n{ADMIN}\n")
    (tmp_path / "inference.token").write_text(INFERENCE + "\n")
    config = (
        f'[auth]\nadmin_token_file = "{tmp_path / "admin.token"}"\n'
        f'inference_token_file = "{tmp_path / "inference.token"}"\n' + fake_model("m", tiny_model)
    )
    # Every log line there is (DEBUG, JSON) and every span exported: no token may show in any of them.
    async with grpc_receiver() as receiver:
        server = servers.start(
            config, "--log-level", "DEBUG", env={**receiver.env(), "LEMONADE_GRPC_LOG_FORMAT": "json"}
        )
        await _roles_over_grpc(server)

        async def refused_pin() -> list[Span] | None:
            spans = [s for s in receiver.received.spans() if s.name == "/lemonade.v1.ModelControl/Pin"]
            return spans if len(spans) == 4 else None  # anonymous, wrong, inference, admin

        pins = await poll(refused_pin, 20, "the Pin calls' spans")
    codes = sorted(attributes(span.attributes)["rpc.grpc.status_code"] for span in pins)
    assert codes == sorted(
        [grpc.StatusCode.OK.value[0], grpc.StatusCode.PERMISSION_DENIED.value[0]]
        + 2 * [grpc.StatusCode.UNAUTHENTICATED.value[0]]
    )
    exported = "".join(str(request) for request in receiver.received.traces)
    for secret in (ADMIN, INFERENCE):
        assert secret not in exported
        assert secret not in server.log()
    assert any(json.loads(line)["level"] == "DEBUG" for line in server.log().splitlines())


async def _roles_over_grpc(server: Server) -> None:
    admin = (("authorization", f"Bearer {ADMIN}"),)
    inference = (("authorization", f"Bearer {INFERENCE}"),)
    wrong = (("authorization", f"Bearer {ADMIN}x"),)
    async with grpc.aio.insecure_channel(server.address) as channel:
        calls = control(channel)
        anonymous = {name: await outcome(call, ()) for name, call in calls.items()}
        mistaken = {name: await outcome(call, wrong) for name, call in calls.items()}
        probe: Any = health_pb2_grpc.HealthStub(channel)  # untyped: grpcio-health-checking has no stubs
        health = await probe.Check(health_pb2.HealthCheckRequest())
        loaded = await outcome(calls["Load"], admin)
        reader = {name: await outcome(call, inference) for name, call in calls.items()}
        unpinned = await outcome(calls["Pin"], admin)
    assert set(anonymous.values()) == {"UNAUTHENTICATED UNAUTHENTICATED"}, anonymous
    assert set(mistaken.values()) == {"UNAUTHENTICATED UNAUTHENTICATED"}, mistaken
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
    assert loaded == "OK"
    assert reader == {
        "Load": "PERMISSION_DENIED PERMISSION_DENIED",
        "Unload": "PERMISSION_DENIED PERMISSION_DENIED",
        "Pin": "PERMISSION_DENIED PERMISSION_DENIED",
        "Status": "OK",
        "ListModels": "OK",
        "Plan": "OK",
        "Watch": "OK",
        "Complete": "OK",
        "Chat": "OK",
    }
    assert unpinned == "OK"


async def test_the_client_and_the_cli_send_their_token(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    (tmp_path / "inference.token").write_text(INFERENCE)
    config = f'[auth]\ninference_token_file = "{tmp_path / "inference.token"}"\n' + fake_model(
        "m", tiny_model
    )
    server = servers.start(config)
    async with connect(server.address, token=INFERENCE) as client:
        models = [m.name for m in await client.models()]
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            [p async for p in client.load("m")]
    assert models == ["m"]
    assert error_details(denied.value).reason == "PERMISSION_DENIED"

    def cli(token: str | None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "LEMONADE_GRPC_TOKEN"}
        if token:
            env["LEMONADE_GRPC_TOKEN"] = token
        command = [sys.executable, "-m", "lemonade_grpc", "models", "--address", server.address]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)

    with_token, without = cli(INFERENCE), cli(None)
    assert with_token.returncode == 0, with_token.stderr
    assert '"name": "m"' in with_token.stdout
    assert without.returncode == 1
    assert "UNAUTHENTICATED UNAUTHENTICATED" in without.stderr


async def test_finding_1_sighup_rotates_the_tokens_and_never_turns_authentication_off(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    # Issue 18 finding 1: SIGHUP reloads what is reloadable; tokens rotate without a restart.
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN + "\n")
    server = servers.start(f'[auth]\nadmin_token_file = "{token_file}"\n' + fake_model("m", tiny_model))
    rotated = "rotated-0123456789abcdef"

    async def status(token: str) -> str:
        async with grpc.aio.insecure_channel(server.address) as channel:
            return await outcome(control(channel)["Status"], (("authorization", f"Bearer {token}"),))

    assert (await status(ADMIN), await status(rotated)) == ("OK", "UNAUTHENTICATED UNAUTHENTICATED")
    token_file.write_text(rotated + "\n")
    server.process.send_signal(signal.SIGHUP)
    await eventually(
        lambda: "SIGHUP: tokens reloaded (1 admin, 0 inference)" in server.log(), 15, "the reload"
    )
    assert (await status(ADMIN), await status(rotated)) == ("UNAUTHENTICATED UNAUTHENTICATED", "OK")

    # An emptied token file would open the server to anyone: refused, the tokens in force kept.
    token_file.write_text("# nobody\n")
    server.process.send_signal(signal.SIGHUP)
    await eventually(lambda: "cannot turn authentication off" in server.log(), 15, "the refused reload")
    assert (await status(ADMIN), await status(rotated)) == ("UNAUTHENTICATED UNAUTHENTICATED", "OK")
    assert ADMIN not in server.log()
    assert rotated not in server.log()
