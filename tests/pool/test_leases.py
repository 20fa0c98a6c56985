"""Leases: a request's hold on a READY model, given back however the request ends (issue 9, issue 19).

A hostile backend (`HOSTILE_BACKEND` in over_grpc.py, written to the test's
directory and run through the `command` recipe) sends what the fake backend
cannot: a body that ends without `data: [DONE]` while the process lives on,
a crash mid-stream, refused connections. Streams and the unary vector RPCs
(Embed, Rerank, Tokenize: each holds a lease like a stream does, and may
load the model first) are cut by deadlines and cancels at every point, and
raced against Unload and reloads. What must hold after each: every error
carries ErrorInfo with the right reason, no lease left, the stream counts
back to zero, the model READY with its idle timer armed, and no backend
process the pool does not know. The vector calls' fake backend answers
after `--answer-seconds` and loads in `--load-seconds`, so the deadlines
fall in each phase whatever the machine's speed; the tests assert outcomes
and states, never timings.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from conftest import (
    Client,
    ServerFactory,
    alive,
    connect,
    fake_model,
    pids_in,
    poll,
    post_to_backend,
    read_all,
)
from lemonade_grpc._gen.lemonade.v1 import inference_pb2
from lemonade_grpc._gen.lemonade.v1 import inference_pb2 as ipb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.testing import is_gone
from over_grpc import (
    complete,
    eventually_async,
    failure,
    hostile_model,
    model_state,
    pool_status,
    wait_streams,
)
from rpc_errors import error_info

# ------------------------------------------------------ streams whose backend fails them (issue 9)


async def test_a_body_that_ends_without_done_is_backend_crashed_and_leaves_no_lease(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    server = servers.start(hostile_model("m", tmp_path, tiny_model, "--mode", "no-done"))
    async with connect(server.address) as client:
        for _ in range(3):
            assert await failure(complete(client, "m")) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_CRASHED")
        await wait_streams(client, (0, 0))
        [model] = (await pool_status(client)).models
        assert model.in_flight == 0


async def test_a_backend_crash_mid_stream_is_backend_crashed_and_counts_return_to_zero(
    servers: ServerFactory, tiny_model: Path
) -> None:
    server = servers.start(
        fake_model("m", tiny_model, "--crash-after-tokens", "5", "--token-seconds", "0.02")
    )
    async with connect(server.address) as client:
        calls = [complete(client, "m", 1000, prompt=f"p{i}") for i in range(3)]
        results = await asyncio.gather(*(failure(call) for call in calls))
        assert set(results) == {(grpc.StatusCode.UNAVAILABLE, "BACKEND_CRASHED")}
        await wait_streams(client, (0, 0))

        async def crash_seen() -> bool | None:
            return True if await model_state(client, "m") != pb.MODEL_STATE_READY else None

        # Once the pool has seen the crash, a request for the crashed (unpinned) model loads it
        # again and runs. (Before, a request can still reach the dying backend, whose port took
        # the connection: BACKEND_CRASHED again, as the loop under CPU burners saw. A refused
        # connection is retried: test_a_backend_refusing_connections_is_a_crash….)
        await poll(crash_seen, 30, "the pool to see the crash")
        chunks = await read_all(complete(client, "m", 3))
        assert chunks[-1].usage.completion_tokens == 3


async def test_a_backend_refusing_connections_is_a_crash_and_the_request_loads_the_model_anew(
    servers: ServerFactory, tiny_model: Path
) -> None:
    """Issue 18: a request reaching a READY model whose backend had just died met "connection
    refused" and ended BACKEND_CRASHED while the model stayed READY until the watchdog saw the
    exit. Here the backend stops listening and stays alive (health checks off), so nothing but
    the refusal tells: the pool must count it a crash, and the request, which reached nothing,
    runs on the model loaded anew."""
    server = servers.start("[pool]\nhealth_check_seconds = 0\n" + fake_model("m", tiny_model))
    async with connect(server.address) as client:
        assert (await read_all(complete(client, "m", 2)))[-1].usage.completion_tokens == 2
        [before] = (await pool_status(client)).models
        await post_to_backend(before.port, "/unlisten", {})
        chunks = await read_all(complete(client, "m", 3))
        assert chunks[-1].usage.completion_tokens == 3
        [after] = (await pool_status(client)).models
        assert (after.state, after.pinned) == (pb.MODEL_STATE_READY, False)
        assert after.pid != before.pid
        await poll(functools.partial(killed, before.pid), 10, "the refusing backend to be killed")
        # A unary RPC takes the same path: once more, on a backend that stops listening.
        await post_to_backend(after.port, "/unlisten", {})
        tokens = await client.inference.Tokenize(inference_pb2.TokenizeRequest(model="m", text="a b"))
        assert len(tokens.ids) == 2
        [again] = (await pool_status(client)).models
        assert again.pid not in (before.pid, after.pid)
        await poll(functools.partial(killed, after.pid), 10, "the second refusing backend to be killed")


async def killed(pid: int) -> bool | None:
    return True if is_gone(pid) else None


async def test_cancel_and_deadline_at_every_point_leave_no_lease_and_rearm_the_idle_timer(
    servers: ServerFactory, tiny_model: Path
) -> None:
    # Slow load (1 s) and slow tokens; one stream slot so later streams queue.
    config = "[pool]\nidle_unload_seconds = 30\n[limits]\nmax_streams = 1\n" + fake_model(
        "m", tiny_model, "--load-seconds", "1", "--token-seconds", "0.01"
    )
    server = servers.start(config)
    async with connect(server.address) as client:
        # Cancelled while its model loads: the load goes on and ends READY with its timer armed.
        loading = complete(client, "m", 5)
        await eventually_async(lambda: model_state(client, "m"), pb.MODEL_STATE_LOADING)
        loading.cancel()
        await eventually_async(lambda: model_state(client, "m"), pb.MODEL_STATE_READY)
        await wait_streams(client, (0, 0))
        [model] = (await pool_status(client)).models
        assert model.in_flight == 0
        assert model.HasField("idle_unload_at")
        # Deadlines from 0 to 300 ms: before admission, queued, mid-stream, at the end.
        calls = [complete(client, "m", 20, prompt=f"d{i}", timeout=i * 0.01) for i in range(30)]
        ended = await asyncio.gather(*(read_all(call) for call in calls), return_exceptions=True)
        codes = {e.code() for e in ended if isinstance(e, grpc.aio.AioRpcError)}
        assert codes <= {grpc.StatusCode.DEADLINE_EXCEEDED}, codes
        await wait_streams(client, (0, 0))
        [model] = (await pool_status(client)).models
        assert model.in_flight == 0
        assert model.HasField("idle_unload_at"), "the idle countdown did not start again"


# --------------------------------- the unary vector RPCs, as a hostile client uses them (issue 19)


TEXTS = ["a cat sat", "paris"]
DOCUMENTS = ["a cat on a mat", "paris is in france", "the capital of france is paris"]


# What a valid call may meet while its model is unloaded or reloaded under it.
CHURN_REASONS = {"MODEL_EVICTED", "LOAD_CANCELLED", "MODEL_NOT_LOADED"}

Call = Callable[..., Awaitable[object]]


def calls(client: Client) -> dict[str, Call]:
    """Each vector RPC, called on model "e" with its keyword arguments (timeout, metadata)."""
    return {
        "Embed": functools.partial(client.inference.Embed, ipb.EmbedRequest(model="e", inputs=TEXTS)),
        "Rerank": functools.partial(
            client.inference.Rerank,
            ipb.RerankRequest(model="e", query="capital of france", documents=DOCUMENTS),
        ),
        "Tokenize": functools.partial(
            client.inference.Tokenize, ipb.TokenizeRequest(model="e", text="a b c")
        ),
    }


def answered_right(rpc: str, answer: object) -> bool:
    """Whether `answer` is what the fake backend gives `rpc` (a wrong or empty answer is not)."""
    if isinstance(answer, ipb.EmbedResponse):
        vectors = [list(e.values) for e in answer.embeddings]
        return rpc == "Embed" and vectors == [[9.0, 3.0], [5.0, 1.0]]
    if isinstance(answer, ipb.RerankResponse):
        return rpc == "Rerank" and [r.index for r in answer.results] == [2, 1, 0]
    if isinstance(answer, ipb.TokenizeResponse):
        return rpc == "Tokenize" and len(answer.ids) == 3
    return False


async def outcome(rpc: str, call: Awaitable[object]) -> str:
    """ "OK" for a right answer, else the status and ErrorInfo reason the call ended with."""
    try:
        answer = await call
    except grpc.aio.AioRpcError as error:
        if error.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            return error.code().name  # the client's own: no ErrorInfo
        return f"{error.code().name} {error_info(error).reason}"
    return "OK" if answered_right(rpc, answer) else f"WRONG {answer}"


async def settled(client: Client) -> pb.ModelStatus:
    """Model "e" once no call holds or waits for it: READY, no lease, its idle timer armed."""

    async def idle() -> pb.ModelStatus | None:
        pool = (await client.control.Status(pb.StatusRequest())).pool
        models = [m for m in pool.models if m.name == "e"]
        if (pool.streams_running, pool.streams_queued) != (0, 0) or len(models) != 1:
            return None
        [model] = models
        return model if model.state == pb.MODEL_STATE_READY and model.in_flight == 0 else None

    model = await poll(idle, 30, "model e READY with no call holding it")
    assert model.HasField("idle_unload_at"), "the idle timer was not armed again"
    return model


def config(tmp_path: Path, tiny_model: Path, streams: int = 1) -> str:
    return f"[pool]\nidle_unload_seconds = 60\n[limits]\nmax_streams = {streams}\n" + fake_model(
        "e",
        tiny_model,
        *("--load-seconds", "1", "--answer-seconds", "0.05", "--pid-log", str(tmp_path / "pids")),
        type_="embedding",
    )


async def test_vector_calls_past_their_deadline_at_every_point_leave_no_lease_and_a_serving_model(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    server = servers.start(config(tmp_path, tiny_model))
    async with connect(server.address) as client:
        rpcs = calls(client)
        # Cancelled while the model loads (its first call loads it): the load goes on to READY.
        loading = rpcs["Embed"]()
        assert isinstance(loading, grpc.aio.UnaryUnaryCall)

        async def is_loading() -> bool | None:
            pool = (await client.control.Status(pb.StatusRequest())).pool
            return True if [m.state for m in pool.models] == [pb.MODEL_STATE_LOADING] else None

        await poll(is_loading, 30, "model e to be loading")
        loading.cancel()
        await settled(client)
        await client.control.Unload(pb.UnloadRequest(model="e"))
        # Deadlines from 0 to 2.9 s on every RPC at once, one stream slot: each call ends queued
        # for its slot, waiting for the load (1 s), mid-answer (50 ms) or answered.
        names = [name for _ in range(10) for name in rpcs]
        ended = await asyncio.gather(
            *(outcome(name, rpcs[name](timeout=i * 0.1)) for i, name in enumerate(names))
        )
        assert set(ended) <= {"OK", "DEADLINE_EXCEEDED"}, ended
        assert "DEADLINE_EXCEEDED" in ended  # the 0 s deadline at least
        await settled(client)
        # The model serves every RPC right afterwards, on the backend the pool knows of.
        for name, call in rpcs.items():
            assert await outcome(name, call()) == "OK"
        model = await settled(client)
        assert alive(pids_in(tmp_path / "pids")) == [model.pid]


async def test_vector_calls_raced_against_unload_and_reload_end_ok_or_a_churn_reason(
    servers: ServerFactory, tiny_model: Path, tmp_path: Path
) -> None:
    server = servers.start(config(tmp_path, tiny_model, streams=4))
    async with connect(server.address) as client:
        rpcs = calls(client)

        async def load(batch: int) -> str:
            request = pb.LoadRequest(model="e", options=pb.LoadOptions(ctx_size=1024 + batch))  # a reload
            try:
                async for _ in client.control.Load(request):
                    pass
            except grpc.aio.AioRpcError as error:  # cancelled by the round's Unload
                return f"Load {error_info(error).reason}"
            return "Load OK"

        seen: set[str] = set()
        for batch in range(6):
            work = [outcome(name, call()) for name, call in rpcs.items() for _ in range(2)]
            ended = await asyncio.gather(
                *work, load(batch), client.control.Unload(pb.UnloadRequest(model="e"))
            )
            assert ended[-2] in ("Load OK", "Load LOAD_CANCELLED"), ended
            results = [result for result in ended[:-2] if isinstance(result, str)]
            failed = {result for result in results if result != "OK"}
            assert all(result.split()[-1] in CHURN_REASONS for result in failed), results
            assert not any(r.split()[0] in ("INTERNAL", "UNKNOWN") for r in results), results
            seen |= set(results)
        assert "OK" in seen
        # Whatever the races left: nothing holds the model, and a call loads it and is answered.
        for name, call in rpcs.items():
            assert await outcome(name, call()) == "OK"
        model = await settled(client)
        assert alive(pids_in(tmp_path / "pids")) == [model.pid]
