"""Load options: absent means "no opinion"; only process options force a reload.

Client flags reach a backend only where the operator allowed them (issue 9).
"""

from __future__ import annotations

from pathlib import Path

import grpc
import psutil
import pytest

from conftest import Events, ServerFactory, connect, fake_model, llama_model
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.core.errors import InvalidOptions
from lemonade_grpc.core.options import EffectiveOptions, RequestedOptions, resolve, validate
from rpc_errors import bad_fields, error_info

DEFAULTS = EffectiveOptions(ctx_size=4096, idle_unload_seconds=None, backend_args=("--threads", "1"))
RUNNING = EffectiveOptions(ctx_size=2048, idle_unload_seconds=60, backend_args=("--threads", "2"))


def test_bare_request_keeps_what_runs() -> None:
    assert resolve(RequestedOptions(), RUNNING, DEFAULTS) == RUNNING


def test_bare_request_when_starting_takes_the_catalog_defaults() -> None:
    assert resolve(RequestedOptions(), None, DEFAULTS) == DEFAULTS


def test_each_given_field_replaces_only_itself() -> None:
    wanted = resolve(RequestedOptions(ctx_size=1024), RUNNING, DEFAULTS)
    assert wanted == EffectiveOptions(1024, 60, ("--threads", "2"))
    wanted = resolve(RequestedOptions(backend_args=()), RUNNING, DEFAULTS)
    assert wanted.backend_args == ()
    assert wanted.ctx_size == 2048


def test_idle_timeout_is_not_part_of_the_process() -> None:
    changed_idle = resolve(RequestedOptions(idle_unload_seconds=5), RUNNING, DEFAULTS)
    assert changed_idle.process_key() == RUNNING.process_key()
    changed_ctx = resolve(RequestedOptions(ctx_size=8), RUNNING, DEFAULTS)
    assert changed_ctx.process_key() != RUNNING.process_key()


ALLOWED = frozenset({"--threads", "--flash-attn", "--temp"})


@pytest.mark.parametrize(
    ("requested", "field"),
    [
        (RequestedOptions(ctx_size=0), "options.ctx_size"),
        (RequestedOptions(ctx_size=(1 << 24) + 1), "options.ctx_size"),
        (RequestedOptions(idle_unload_seconds=-1), "options.idle_unload_seconds"),
        (RequestedOptions(idle_unload_seconds=7_900_000_000), "options.idle_unload_seconds"),
        (RequestedOptions(backend_args=("--port", "9")), "options.backend_args.args"),
        (RequestedOptions(backend_args=("--model=/etc/passwd",)), "options.backend_args.args"),
        (RequestedOptions(backend_args=("-c", "9")), "options.backend_args.args"),
        (RequestedOptions(backend_args=("4",)), "options.backend_args.args"),
        (RequestedOptions(backend_args=("--threads", "a\0b")), "options.backend_args.args"),
        (RequestedOptions(backend_args=("--threads", "1") * 33), "options.backend_args.args"),
        (RequestedOptions(backend_args=("--threads", "x" * 1025)), "options.backend_args.args"),
        (RequestedOptions(backend_args=("--threads", *["x" * 1000] * 5)), "options.backend_args.args"),
    ],
)
def test_invalid_options_name_the_field(requested: RequestedOptions, field: str) -> None:
    with pytest.raises(InvalidOptions) as raised:
        validate(requested, "m", ALLOWED)
    assert raised.value.field == field


def test_allowed_flags_with_values_pass() -> None:
    validate(RequestedOptions(ctx_size=1, backend_args=("--threads", "4", "--flash-attn=on")), "m", ALLOWED)
    validate(RequestedOptions(backend_args=("--temp", "-0.5")), "m", ALLOWED)  # a negative value, not a flag
    validate(RequestedOptions(backend_args=()), "m", frozenset())


@pytest.mark.parametrize(
    "args",
    [
        ("--tools", "all"),  # llama-server's shell endpoint
        ("--log-file", "/any/path"),  # overwrites any file
        ("--po", "9"),  # an argparse program takes a prefix for --port
        ("--threads=4", "--tools=all"),
        ("--Threads", "4"),  # flags match exactly
    ],
)
def test_client_flags_the_operator_did_not_allow_are_refused_issue_9_finding_2(args: tuple[str, ...]) -> None:
    with pytest.raises(InvalidOptions) as raised:
        validate(RequestedOptions(backend_args=args), "tiny", ALLOWED)
    assert raised.value.field == "options.backend_args.args"
    # The refusal names the flag and the config keys that would allow it.
    flag = next(a for a in args if a.split("=")[0] not in ALLOWED).split("=")[0]
    assert repr(flag) in raised.value.message
    assert "models.tiny.allowed_args" in raised.value.message
    assert "pool.allowed_args" in raised.value.message


def test_by_default_no_client_flag_is_allowed() -> None:
    with pytest.raises(InvalidOptions, match=r"allowed: none"):
        validate(RequestedOptions(backend_args=("--threads", "4")), "tiny", frozenset())


# ------------------------------------------------------------------------------- issue 9 finding 2


async def test_client_backend_flags_are_refused_unless_the_operator_allowed_them(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    # llama-server's `--tools all` exposes a shell endpoint; `--log-file`
    # overwrites any file. A client may pass neither, nor any other flag the
    # operator did not allow.
    victim = tmp_path / "overwritten.txt"
    victim.write_text("precious")
    server = servers.start(llama_model("tiny", tiny_model))
    async with connect(server.address) as client:
        for args in (["--tools", "all"], ["--log-file", str(victim)], ["--threads", "1"]):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.load_all("tiny", options=pb.LoadOptions(backend_args=pb.BackendArgs(args=args)))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(refused.value).reason == "INVALID_OPTIONS"
            assert bad_fields(refused.value) == ["options.backend_args.args"]
            details = refused.value.details() or ""
            assert repr(args[0]) in details
            assert "models.tiny.allowed_args" in details
        status = await client.control.Status(pb.StatusRequest())
        assert status.pool.backends_started == 0, "a refused load starts nothing"
        assert victim.read_text() == "precious"


async def test_flags_the_operator_allowed_reach_the_backend(servers: ServerFactory, tiny_model: Path) -> None:
    server = servers.start(llama_model("tiny", tiny_model) + 'allowed_args = ["--threads"]\n')
    async with connect(server.address) as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.load_all(
                "tiny",
                options=pb.LoadOptions(backend_args=pb.BackendArgs(args=["--threads", "1", "--tools=all"])),
            )
        assert error_info(refused.value).reason == "INVALID_OPTIONS"
        ready = await client.ready(
            "tiny", options=pb.LoadOptions(backend_args=pb.BackendArgs(args=["--threads", "1"]))
        )
        assert psutil.Process(ready.pid).cmdline()[-2:] == ["--threads", "1"]
        assert list(ready.options.backend_args.args) == ["--threads", "1"]


# ------------------------------------------------------------------------------- issue 9 finding 4


async def test_an_idle_timeout_that_would_overflow_is_refused_and_status_keeps_working(
    servers: ServerFactory, tiny_model: Path
) -> None:
    server = servers.start(fake_model("m", tiny_model))
    async with connect(server.address) as client:
        watch = Events(client.control)
        await watch.wait_for(lambda m: m.HasField("snapshot"), 5, "the snapshot")
        await client.ready("m")
        for seconds in (7_900_000_000, 31_536_001, -1):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.load_all("m", options=pb.LoadOptions(idle_unload_seconds=seconds))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert bad_fields(refused.value) == ["options.idle_unload_seconds"]
        year = await client.ready("m", options=pb.LoadOptions(idle_unload_seconds=31_536_000))
        assert year.HasField("idle_unload_at")
        status = await client.control.Status(pb.StatusRequest())
        assert [m.options.idle_unload_seconds for m in status.pool.models] == [31_536_000]
        await client.control.Pin(pb.PinRequest(model="m", pinned=True))
        await watch.wait_for(lambda m: m.HasField("pin_changed"), 5, "the pin after the refused loads")
        watch.close()
