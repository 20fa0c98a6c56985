"""Pool races over gRPC, hostile state files and config (issue #9, from an adversarial pass).

Storms of loads, unloads, pins and streams with client deadlines, a crashing
pinned model and memory pressure keep every invariant; a request during a
pinned model's restart backoff keeps its pin and options; odd backend
records or pin files never stop the server nor kill an unrelated process;
llama-server's underscore spellings of reserved flags are refused. Each of
the last kind failed before its fix. Fake backends write their
pid to a log when they start, so "how many processes ran" is the operating
system's answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import grpc
import psutil
import pytest

from conftest import (
    Client,
    Events,
    ProcessSampler,
    ServerFactory,
    alive,
    connect,
    fake_model,
    pids_in,
    poll,
    warning,
)
from lemonade_grpc._gen.lemonade.v1 import inference_pb2
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc._gen.lemonade.v1.model_control_pb2_grpc import ModelControlStub
from lemonade_grpc.core.options import EffectiveOptions
from lemonade_grpc.store.pin_file import decode
from rpc_errors import error_info


async def status_of(client: Client, name: str) -> pb.ModelStatus | None:
    status = await client.control.Status(pb.StatusRequest())
    return next((m for m in status.pool.models if m.name == name), None)


def saved_pins(state_dir: Path) -> dict[str, EffectiveOptions]:
    path = state_dir / "pins.json"
    return dict(decode(path.read_text())) if path.exists() else {}


async def at_rest(client: Client, logs: list[Path]) -> tuple[pb.PoolStatus, list[int], list[int]]:
    """The pool once nothing is loading, queued or stopping and the live backends are the ones it shows.

    With the live pids and Status's. A crashed backend is killed just after its model goes FAILED,
    so the two may differ for a moment; they must agree within the deadline.
    """

    async def settled() -> tuple[pb.PoolStatus, list[int], list[int]] | None:
        pool = (await client.control.Status(pb.StatusRequest())).pool
        busy = pool.load_in_flight.model or pool.queue
        if busy or any(m.state in (pb.MODEL_STATE_LOADING, pb.MODEL_STATE_UNLOADING) for m in pool.models):
            return None
        live = sorted(alive([pid for log in logs for pid in pids_in(log)]))
        in_status = sorted(m.pid for m in pool.models if m.pid)
        return (pool, live, in_status) if live == in_status else None

    return await poll(settled, 15, "the pool at rest, its live backends the ones Status shows")


# ------------------------------------------------ a crashed pinned model and inference


async def test_a_request_during_a_pinned_models_restart_backoff_keeps_its_pin_and_options(
    servers: ServerFactory, tiny_model: Path
) -> None:
    """A pinned model crashes; before its restart, a Complete for it arrives.

    Promised: a crashed pinned model "is restarted with backoff and keeps
    its pin and options"; inference loads a model that is not loaded "with
    its catalog options" and `pinned` absent keeps the current pin.
    """
    config = "[pool]\nrestart_backoff_seconds = 5\n" + fake_model("m", tiny_model)
    server = servers.start(config)
    async with connect(server.address) as client:
        events = Events(client.control)
        before = await client.ready("m", pinned=True, options=pb.LoadOptions(ctx_size=777))
        os.kill(before.pid, signal.SIGKILL)
        await events.wait_for(warning("RESTART_SCHEDULED"), 10, "the restart to be scheduled")
        crashed = await status_of(client, "m")
        assert crashed is not None
        assert crashed.state == pb.MODEL_STATE_FAILED
        assert crashed.pinned
        # Within the 5 s backoff: a request for the model.
        request = inference_pb2.CompleteRequest(model="m", prompt="x", max_tokens=2)
        replies = [r async for r in client.inference.Complete(request)]
        assert replies[-1].finish_reason
        after = await status_of(client, "m")
        events.close()
    assert after is not None
    assert after.state == pb.MODEL_STATE_READY
    assert after.pid != before.pid
    assert after.pinned, "a request during the restart backoff unpinned the crashed pinned model"
    assert after.options.ctx_size == 777, "…and dropped its pinned options"
    assert list(saved_pins(server.state_dir)) == ["m"], "…and its pin is gone from pins.json"


async def test_finding_2_an_inference_token_never_drops_a_crashed_models_pin(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    """Issue 18 finding 2: a pinned model crashed, its backend briefly could not start; one Complete
    with an inference token cancelled the pending restart and, when its own load failed, dropped the
    pin: the model stayed FAILED for good, pins.json empty, while Status still said pinned."""
    admin, reader = "admin-0123456789abcdef", "infer-0123456789abcdef"
    (tmp_path / "admin.token").write_text(admin)
    (tmp_path / "inference.token").write_text(reader)
    broken = tmp_path / "backend-cannot-start"
    config = (
        f'[auth]\nadmin_token_file = "{tmp_path / "admin.token"}"\n'
        f'inference_token_file = "{tmp_path / "inference.token"}"\n'
        "[pool]\nrestart_backoff_seconds = 1\nrestart_backoff_max_seconds = 1\nmax_restarts = 1000\n"
        + fake_model("m", tiny_model, "--fail-start-while", str(broken))
    )
    server = servers.start(config)
    as_admin = (("authorization", f"Bearer {admin}"),)
    as_reader = (("authorization", f"Bearer {reader}"),)
    async with grpc.aio.insecure_channel(server.address) as channel:
        client = Client(channel)
        loaded = [
            r async for r in client.control.Load(pb.LoadRequest(model="m", pinned=True), metadata=as_admin)
        ]
        before = loaded[-1].status
        assert before.pinned
        broken.touch()
        os.kill(before.pid, signal.SIGKILL)

        async def status() -> pb.ModelStatus:
            pool = (await client.control.Status(pb.StatusRequest(), metadata=as_reader)).pool
            [model] = [m for m in pool.models if m.name == "m"]
            return model

        async def crash_seen() -> pb.ModelStatus | None:
            model = await status()
            return model if model.state != pb.MODEL_STATE_READY else None

        # Once the server has seen the crash. A request sent before can still reach the dying
        # backend, whose port took the connection, and end BACKEND_CRASHED: true of that request,
        # a race of the test's, not the finding. (A refused connection is counted a crash at once
        # and the request retried: test_a_backend_refusing_connections_is_a_crash….)
        await poll(crash_seen, 30, "the server to see the crash")
        request = inference_pb2.CompleteRequest(model="m", prompt="x", max_tokens=2)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            [r async for r in client.inference.Complete(request, metadata=as_reader)]
        assert (refused.value.code(), error_info(refused.value).reason) == (
            grpc.StatusCode.UNAVAILABLE,
            "BACKEND_START_FAILED",
        )

        failed = await status()
        assert (failed.state, failed.pinned) == (pb.MODEL_STATE_FAILED, True)
        assert list(saved_pins(server.state_dir)) == ["m"], "the request's failed load dropped the pin"
        # The backend can start again: the restart schedule, which the request must not have ended,
        # brings the model back with its pin.
        broken.unlink()

        async def restarted() -> pb.ModelStatus | None:
            model = await status()
            return model if model.state == pb.MODEL_STATE_READY else None

        after = await poll(restarted, 30, "the crashed pinned model to be restarted")
    assert after.pinned
    assert after.pid != before.pid
    assert list(saved_pins(server.state_dir)) == ["m"]


# ------------------------------------------------------------ hostile state files


def start_on(servers: ServerFactory, state_dir: Path, config: str) -> tuple[int | None, str]:
    """Start `serve` on a prepared `state_dir`; (exit status or None while it runs, its log).

    Waits until it has begun restoring pins and then answers a Status with
    nothing loading or queued (all the boot started is done), or exits,
    whichever comes first.
    """
    try:
        server = servers.start(config, state_dir=state_dir)
    except pytest.fail.Exception as failed:
        return -1, str(failed)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.process.poll() is None:
        if "pins: restoring" in server.log():
            break
        time.sleep(0.02)
    # Issue 18 finding 12: was a sleep "for anything the boot does after the restore".
    with grpc.insecure_channel(server.address) as channel:
        control = ModelControlStub(channel)
        while time.monotonic() < deadline and server.process.poll() is None:
            try:
                pool = control.Status(pb.StatusRequest(), timeout=5).pool
            except grpc.RpcError:
                break  # it died (the caller reads its status) or cannot answer (the log says why)
            if not pool.load_in_flight.model and not pool.queue:
                break
            time.sleep(0.02)
    return server.process.poll(), server.log()


HOSTILE_BACKENDS = {
    "negative-pid": '{"backends": [{"pid": -1, "model": "m", "create_time": 0}]}',
    "infinite-pid": '{"backends": [{"pid": Infinity, "model": "m", "create_time": 0}]}',
    "deeply-nested": "[" * 100_000,
}


@pytest.mark.parametrize("text", HOSTILE_BACKENDS.values(), ids=HOSTILE_BACKENDS.keys())
def test_an_odd_backend_record_is_discarded_and_the_server_starts(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path, text: str
) -> None:
    """Promised (registry.py `reap_stale`): "An unreadable record is logged and discarded"."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "backends.json").write_text(text)
    status, log = start_on(servers, state_dir, fake_model("m", tiny_model))
    assert status is None, f"serve did not start on an odd backends.json:\n{log[-1500:]}"


def test_a_deeply_nested_pin_file_is_moved_aside_and_the_server_keeps_running(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    """Promised: "A file that does not decode ... is moved aside (STATE_FILE_CORRUPT)"."""
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "pins.json").write_text('{"version": 1, "pinned": ' + "[" * 100_000)
    status, log = start_on(servers, state_dir, fake_model("m", tiny_model))
    assert status is None, f"serve died on a deeply nested pins.json:\n{log[-1500:]}"
    assert not (state_dir / "pins.json").exists(), "the corrupt pin file was not moved aside"


def test_a_recorded_pid_of_an_unrelated_live_process_is_never_killed(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    """Records naming live processes that are not ours (other start time) are left alone.

    The test runner itself, an unrelated process-group leader, init, and
    records of the wrong types: the server starts, and every process lives.
    """
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        me = psutil.Process()
        records = [
            {"pid": me.pid, "model": "m", "create_time": me.create_time() + 0.01},
            {
                "pid": bystander.pid,
                "model": "m",
                "create_time": psutil.Process(bystander.pid).create_time() - 1,
            },
            {"pid": 1, "model": "m", "create_time": 0},
            {"pid": str(bystander.pid), "model": "m", "create_time": "0"},
            {"pid": [bystander.pid], "model": "m", "create_time": 0},
        ]
        state_dir = tmp_path / "state"
        state_dir.mkdir()
        (state_dir / "backends.json").write_text(json.dumps({"backends": records}))
        status, log = start_on(servers, state_dir, fake_model("m", tiny_model))
        assert status is None, log[-1500:]
        assert bystander.poll() is None, "an unrelated process was killed at boot"
        assert "reaped stale backend" not in log
    finally:
        bystander.kill()
        bystander.wait()


# ------------------------------------------------------- races through the gRPC server


def pid_logs(tmp_path: Path, *names: str) -> list[Path]:
    return [tmp_path / f"{name}.pids" for name in names]


def check_error(error: grpc.aio.AioRpcError, problems: list[str], what: str) -> None:
    """A client-side end (deadline, cancel) needs no reason; any other status needs an ErrorInfo."""
    code = error.code()
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        problems.append(f"{what}: {code.name} {error.details()}")
        return
    try:
        error_info(error)
    except AssertionError as missing:
        problems.append(f"{what}: {code.name} without ErrorInfo ({missing})")


async def storm_op(client: Client, rng: random.Random, names: tuple[str, ...], problems: list[str]) -> None:
    name = rng.choice(names)
    timeout = rng.uniform(0.005, 1.0)
    kind = rng.choice(["load", "load", "unload", "pin", "complete", "complete", "cancel-load"])
    what = f"{kind} {name} (timeout {timeout:.3f})"
    try:
        if kind in ("load", "cancel-load"):
            fields: dict[str, object] = {}
            if rng.random() < 0.7:
                fields["options"] = pb.LoadOptions(ctx_size=rng.choice([512, 1024]))
            if rng.random() < 0.4:
                fields["pinned"] = rng.random() < 0.5
            call = client.control.Load(pb.LoadRequest(model=name, **fields), timeout=timeout)  # type: ignore[arg-type]
            if kind == "cancel-load":
                await asyncio.sleep(rng.uniform(0.005, 0.3))
                call.cancel()
            else:
                async for _ in call:
                    pass
        elif kind == "unload":
            target = rng.choice([name, ""])
            await client.control.Unload(pb.UnloadRequest(model=target), timeout=timeout)
        elif kind == "pin":
            await client.control.Pin(pb.PinRequest(model=name, pinned=rng.random() < 0.5), timeout=timeout)
        else:
            request = inference_pb2.CompleteRequest(model=name, prompt="x", max_tokens=rng.randint(1, 30))
            async for _ in client.inference.Complete(request, timeout=timeout):
                pass
    except grpc.aio.AioRpcError as error:
        check_error(error, problems, what)
    except asyncio.CancelledError:
        pass


STORM_CONFIG = (
    "[pool]\nmax_loaded = {{ llm = 1 }}\nevict_grace_seconds = 0.2\nstop_grace_seconds = 1\n"
    "idle_unload_seconds = 1\n"
)


@pytest.mark.parametrize("seed", [1, 2])
async def test_random_loads_unloads_pins_and_streams_with_deadlines_keep_the_pool_consistent(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path, seed: int
) -> None:
    """One slot, two models; clients give up at random points. Promised invariants hold.

    Sampled all along: live processes (OS, pid logs) <= slots. At rest: no
    model LOADING or UNLOADING, every live backend in Status, pins.json is
    the pins in Status, every error had an ErrorInfo and none was UNKNOWN or INTERNAL.
    """
    logs = pid_logs(tmp_path, "a", "b")
    config = STORM_CONFIG.format() + "".join(
        fake_model(n, tiny_model, "--load-seconds", "0.1", "--token-seconds", "0.02", "--pid-log", str(log))
        for n, log in zip(("a", "b"), logs, strict=True)
    )
    server = servers.start(config)
    rng = random.Random(seed)
    problems: list[str] = []

    async with connect(server.address) as client:
        sampler = ProcessSampler(*logs)

        async def worker(worker_rng: random.Random) -> None:
            end = time.monotonic() + 6
            while time.monotonic() < end:
                await storm_op(client, worker_rng, ("a", "b"), problems)

        await asyncio.gather(*(worker(random.Random(rng.random())) for _ in range(6)))

        pool, live, in_status = await at_rest(client, logs)
        most = sampler.stop()
        pinned_in_status = {m.name: m.options.ctx_size for m in pool.models if m.pinned}
    assert problems == []
    assert most <= 1, f"{most} live backends with one slot"
    assert live == in_status, f"live backends {live}, Status {in_status}"
    on_disk = {name: options.ctx_size for name, options in saved_pins(server.state_dir).items()}
    assert on_disk == pinned_in_status


async def test_storm_with_a_crashing_pinned_model_and_memory_pressure_keeps_the_pool_consistent(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    """Two slots, three models: one pinned that crashes 0.4 s after each start (restarted with a short
    backoff), and a memory reserve just below what is free, so that loads evict for memory
    and the periodic check evicts under pressure while clients load, unload, pin and stream.
    """
    logs = pid_logs(tmp_path, "a", "b", "c")
    reserve = (psutil.virtual_memory().available >> 20) - 75
    config = (
        f"[pool]\nmax_loaded = {{ llm = 2 }}\nevict_grace_seconds = 0.2\nstop_grace_seconds = 1\n"
        f"memory_reserve_mb = {reserve}\nmemory_check_seconds = 0.2\nrestart_backoff_seconds = 0.1\n"
        "restart_backoff_max_seconds = 0.2\nmax_restarts = 1000\n"
        + fake_model("a", tiny_model, "--token-seconds", "0.02", "--pid-log", str(logs[0]))
        + fake_model("b", tiny_model, "--token-seconds", "0.02", "--pid-log", str(logs[1]))
        + fake_model("c", tiny_model, "--exit-after-seconds", "0.4", "--pid-log", str(logs[2]))
    )
    server = servers.start(config)
    rng = random.Random(3)
    problems: list[str] = []

    async with connect(server.address) as client:
        events = Events(client.control)
        sampler = ProcessSampler(*logs)
        try:
            await client.load("c", pinned=True)
        except grpc.aio.AioRpcError as error:
            check_error(error, problems, "load c pinned")

        async def worker(worker_rng: random.Random) -> None:
            end = time.monotonic() + 7
            while time.monotonic() < end:
                await storm_op(client, worker_rng, ("a", "b"), problems)

        async def keep_c_pinned() -> None:
            end = time.monotonic() + 7
            while time.monotonic() < end:
                try:
                    await client.load("c", pinned=True)
                except grpc.aio.AioRpcError as error:
                    check_error(error, problems, "load c pinned")
                await asyncio.sleep(0.3)

        await asyncio.gather(keep_c_pinned(), *(worker(random.Random(rng.random())) for _ in range(4)))
        await client.control.Unload(pb.UnloadRequest(model="c"))  # stop the crash loop

        pool, live, in_status = await at_rest(client, logs)
        most = sampler.stop()
        pinned_in_status = {m.name: m.options.ctx_size for m in pool.models if m.pinned}
        events.close()
    reasons = {
        m.model_unloaded.reason for m in events.messages() if m.WhichOneof("event") == "model_unloaded"
    }
    assert problems == []
    assert most <= 2, f"{most} live backends with two slots"
    assert live == in_status, f"live backends {live}, Status {in_status}"
    on_disk = {name: options.ctx_size for name, options in saved_pins(server.state_dir).items()}
    assert on_disk == pinned_in_status
    assert pb.UNLOAD_REASON_CRASHED in reasons, "the crash and restart path was not exercised"


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "line",
    [
        'args = ["--ctx_size", "64"]',
        'args = ["--api_key", "secret"]',
        'allowed_args = ["--api_key"]',
        'allowed_args = ["--model_url"]',
        'allowed_args = ["--hf_repo"]',
    ],
)
def test_llama_servers_underscore_spellings_of_reserved_flags_are_refused(
    tmp_path: Path, tiny_model: Path, line: str
) -> None:
    """llama-server reads `--ctx_size` as `--ctx-size` (it turns `_` into `-` in `--` flags:
    `llama-server --port_x 1` says "invalid argument: --port-x", and `--log_file F` writes F).

    Promised (llama_flags.py RESERVED_BACKEND_ARGS): "The config refuses them in `args` and
    `allowed_args` of a llamacpp model".
    """
    from lemonade_grpc import config as config_module

    path = tmp_path / "config.toml"
    path.write_text(f'[models.tiny]\nrecipe = "llamacpp"\npath = "{tiny_model}"\n{line}\n')
    with pytest.raises(config_module.ConfigError):
        config_module.load(config_module.Overrides(config=path), env={})


async def test_a_saved_pin_no_request_could_make_is_refused_at_boot_not_an_internal_error(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    """pins.json holding a lone surrogate (valid JSON, "\\ud800"; no gRPC string can carry one)
    as the value of an allowed flag. Promised: a file holding what no request could ask for is
    corrupt (moved aside, STATE_FILE_CORRUPT) or the pin is dropped (PINS_NOT_RESTORED); a
    bug of ours is INTERNAL_ERROR, so it must not end up there.
    """
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    entry = {"ctx_size": 512, "idle_unload_seconds": None, "backend_args": ["--threads", "\ud800"]}
    (state_dir / "pins.json").write_text(json.dumps({"version": 1, "pinned": {"m": entry}}))
    config = '[pool]\nallowed_args = ["--threads"]\n' + fake_model("m", tiny_model)
    server = servers.start(config, state_dir=state_dir)
    async with connect(server.address) as client:
        events = Events(client.control, since=0)
        _, first = await events.wait_for(
            lambda m: m.WhichOneof("event") == "warning", 10, "a warning about the saved pin"
        )
        events.close()
    assert first.warning.code in ("STATE_FILE_CORRUPT", "PINS_NOT_RESTORED"), first.warning
    assert "internal error" not in server.log().lower()
