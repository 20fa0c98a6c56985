"""Reading the rich error details (google.rpc.Status) of a failed call in tests."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from lemonade_grpc.client import DOMAIN, error_details


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo of `error`; fails the test when there is none."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no google.rpc.Status in the trailers of {error.code()}: {error.details()}"
    assert status.code == error.code().value[0]
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert info.domain == DOMAIN
            return info
    raise AssertionError(f"no ErrorInfo in {status}")


def bad_fields(error: grpc.aio.AioRpcError) -> list[str]:
    """The fields named by the BadRequest detail of `error` (empty when none)."""
    return list(error_details(error).bad_fields)
