"""Load, Unload, Status and ListModels against a real llama-server."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import psutil
import pytest

from conftest import eventually, next_message
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.testing import is_gone
from rpc_errors import bad_fields, error_info

if TYPE_CHECKING:
    from lemonade_grpc._gen.lemonade.v1.model_control_pb2_grpc import ModelControlAsyncStub

PHASE_ORDER = [pb.LOAD_PHASE_QUEUED, pb.LOAD_PHASE_STARTING, pb.LOAD_PHASE_LOADING, pb.LOAD_PHASE_READY]


async def load(control: ModelControlAsyncStub, request: pb.LoadRequest) -> list[pb.LoadResponse]:
    return [response async for response in control.Load(request)]


async def test_load_streams_phases_in_order_and_ends_ready(control: ModelControlAsyncStub) -> None:
    responses = await load(control, pb.LoadRequest(model="tiny"))
    phases = [r.phase for r in responses]
    # Each phase at least once, in order, nothing after READY.
    assert sorted(set(phases), key=PHASE_ORDER.index) == PHASE_ORDER
    assert phases == sorted(phases, key=PHASE_ORDER.index)
    ready = responses[-1]
    assert ready.phase == pb.LOAD_PHASE_READY
    assert not ready.already_loaded
    status = ready.status
    assert status.name == "tiny"
    assert status.state == pb.MODEL_STATE_READY
    assert status.options.ctx_size == 4096
    assert status.HasField("loaded_at")
    process = psutil.Process(status.pid)
    assert "llama-server" in process.cmdline()[0] or "llama-server" in " ".join(process.cmdline())
    assert f"--port {status.port}" in " ".join(process.cmdline())


async def test_bare_load_of_loaded_model_is_one_ready_message_same_pid(
    control: ModelControlAsyncStub,
) -> None:
    first = (await load(control, pb.LoadRequest(model="tiny", options=pb.LoadOptions(ctx_size=2048))))[-1]
    again = await load(control, pb.LoadRequest(model="tiny"))
    assert len(again) == 1
    assert again[0].phase == pb.LOAD_PHASE_READY
    assert again[0].already_loaded
    assert again[0].status.pid == first.status.pid
    # An absent option keeps the running value: still 2048, not the catalog's 4096.
    assert again[0].status.options.ctx_size == 2048


async def test_load_with_other_ctx_size_reloads_with_new_pid(control: ModelControlAsyncStub) -> None:
    first = (await load(control, pb.LoadRequest(model="tiny")))[-1]
    watch = control.Watch(pb.WatchRequest())
    await next_message(watch)  # the snapshot
    second = (await load(control, pb.LoadRequest(model="tiny", options=pb.LoadOptions(ctx_size=1024))))[-1]
    assert not second.already_loaded
    assert second.status.pid != first.status.pid
    assert second.status.options.ctx_size == 1024
    while not (event := await next_message(watch)).HasField("model_unloaded"):
        pass
    watch.cancel()
    assert event.model_unloaded.reason == pb.UNLOAD_REASON_RELOAD
    assert event.model_unloaded.pid == first.status.pid
    await eventually(lambda: is_gone(first.status.pid), 5, "the old backend to exit")


async def test_status_and_list_models_follow_the_pool(control: ModelControlAsyncStub) -> None:
    empty = await control.Status(pb.StatusRequest())
    assert list(empty.pool.models) == []
    assert [(s.type, s.max_loaded, s.used) for s in empty.pool.slots] == [
        (pb.MODEL_TYPE_EMBEDDING, 1, 0),
        (pb.MODEL_TYPE_LLM, 1, 0),
    ]
    catalog = await control.ListModels(pb.ListModelsRequest())
    assert [(m.name, m.loaded) for m in catalog.models] == [
        ("smollm2", False),
        ("smollm2-embed", False),
        ("tiny", False),
    ]

    ready = (await load(control, pb.LoadRequest(model="tiny")))[-1]
    status = await control.Status(pb.StatusRequest())
    [model] = status.pool.models
    assert model.pid == ready.status.pid
    assert model.state == pb.MODEL_STATE_READY
    assert model.rss_bytes > 0
    assert status.pool.memory.total_bytes >= status.pool.memory.available_bytes > 0
    assert status.pool.sequence > empty.pool.sequence
    catalog = await control.ListModels(pb.ListModelsRequest())
    assert [(m.name, m.loaded, m.state) for m in catalog.models] == [
        ("smollm2", False, pb.MODEL_STATE_UNSPECIFIED),
        ("smollm2-embed", False, pb.MODEL_STATE_UNSPECIFIED),
        ("tiny", True, pb.MODEL_STATE_READY),
    ]


async def test_unload_stops_the_process(control: ModelControlAsyncStub) -> None:
    ready = (await load(control, pb.LoadRequest(model="tiny")))[-1]
    response = await control.Unload(pb.UnloadRequest(model="tiny"))
    assert list(response.unloaded) == ["tiny"]
    await eventually(lambda: is_gone(ready.status.pid), 5, "the backend to exit")
    assert list((await control.Status(pb.StatusRequest())).pool.models) == []
    # Unloading what is not loaded is not an error, and says nothing was unloaded.
    assert list((await control.Unload(pb.UnloadRequest(model="tiny"))).unloaded) == []


async def test_load_of_unknown_model_is_not_found(control: ModelControlAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await load(control, pb.LoadRequest(model="no-such-model"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(raised.value).reason == "MODEL_NOT_FOUND"
    assert "tiny" in (raised.value.details() or "")  # names what is known


@pytest.mark.parametrize(
    ("request_", "field", "reason"),
    [
        (pb.LoadRequest(), "model", "INVALID_REQUEST"),
        (
            pb.LoadRequest(model="tiny", options=pb.LoadOptions(ctx_size=0)),
            "options.ctx_size",
            "INVALID_OPTIONS",
        ),
        (
            pb.LoadRequest(model="tiny", options=pb.LoadOptions(idle_unload_seconds=-1)),
            "options.idle_unload_seconds",
            "INVALID_OPTIONS",
        ),
        (
            pb.LoadRequest(
                model="tiny", options=pb.LoadOptions(backend_args=pb.BackendArgs(args=["--port=1"]))
            ),
            "options.backend_args.args",
            "INVALID_OPTIONS",
        ),
    ],
)
async def test_invalid_load_is_invalid_argument_naming_the_field(
    control: ModelControlAsyncStub, request_: pb.LoadRequest, field: str, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await load(control, request_)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(raised.value).reason == reason
    assert bad_fields(raised.value) == [field]
    # Nothing was started.
    assert list((await control.Status(pb.StatusRequest())).pool.models) == []
