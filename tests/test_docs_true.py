"""Issue 18 finding 14: what the docs and error reasons say is what the code does.

(a) The calls an inference token may make, as security.md and
configuration.md list them, are `access.READ_ONLY_CONTROL` and Inference's.
(d) A backend that answers something that is not HTTP failed that request
(UNAVAILABLE `BACKEND_ERROR`, the reason of every other malformed answer);
it did not crash: its model stays READY, on the same process, and the next
request is served.
"""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from conftest import ServerFactory, connect, fake_model, read_all
from lemonade_grpc._gen.lemonade.v1 import inference_pb2
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc.core import access
from rpc_errors import error_info

DOCS = Path(__file__).resolve().parent.parent / "docs"
CONTROL_METHODS = {method.name for method in pb.DESCRIPTOR.services_by_name["ModelControl"].methods}
INFERENCE_METHODS = {method.name for method in inference_pb2.DESCRIPTOR.services_by_name["Inference"].methods}


def inference_row(doc: str, marker: str) -> set[str]:
    """The method names mentioned on the line of `doc` that starts with `marker`."""
    [line] = [line for line in (DOCS / doc).read_text().splitlines() if line.startswith(marker)]
    return set(re.findall(r"[A-Za-z]+", line))


@pytest.mark.parametrize(
    ("doc", "marker"),
    [("security.md", "| inference |"), ("configuration.md", "| `inference_token_file` |")],
)
def test_finding_14_the_docs_list_the_calls_an_inference_token_may_make(doc: str, marker: str) -> None:
    named = inference_row(doc, marker)
    assert named & CONTROL_METHODS == set(access.READ_ONLY_CONTROL), (
        f"{doc}: {sorted(named & CONTROL_METHODS)}"
    )
    assert named >= INFERENCE_METHODS, f"{doc} leaves out {sorted(INFERENCE_METHODS - named)}"
    assert all(access.required_role(f"/lemonade.v1.Inference/{name}") for name in INFERENCE_METHODS)
    for name in CONTROL_METHODS:  # and the rules themselves say so
        needed = access.required_role(f"/lemonade.v1.ModelControl/{name}")
        assert needed is not None
        assert access.allows(access.Role.INFERENCE, needed) == (name in named), name


async def test_finding_14_an_answer_that_is_not_http_is_backend_error_and_the_model_stays_ready(
    servers: ServerFactory, tiny_model: Path
) -> None:
    server = servers.start(fake_model("m", tiny_model, "--not-http-requests", "1"))
    async with connect(server.address) as client:
        loaded = await client.ready("m")
        request = inference_pb2.CompleteRequest(model="m", prompt="x", max_tokens=3)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await read_all(client.inference.Complete(request))
        assert (failed.value.code(), error_info(failed.value).reason) == (
            grpc.StatusCode.UNAVAILABLE,
            "BACKEND_ERROR",
        )
        assert "not valid HTTP" in (failed.value.details() or "")
        [model] = (await client.control.Status(pb.StatusRequest())).pool.models
        assert (model.state, model.pid, model.in_flight) == (pb.MODEL_STATE_READY, loaded.pid, 0)
        replies = await read_all(client.inference.Complete(request))
        assert replies[-1].usage.completion_tokens == 3
        [model] = (await client.control.Status(pb.StatusRequest())).pool.models
        assert (model.state, model.pid) == (pb.MODEL_STATE_READY, loaded.pid)
