"""grpc.aio's ERROR for a call whose client left as the answer went out: a DEBUG line (soak, issue 13)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from lemonade_grpc.telemetry.logs import ClientGoneFilter

MESSAGE = "ExecuteBatchError raised in core by servicer method [/lemonade.v1.Inference/Chat]"


def log_to(logger: logging.Logger, message: str) -> None:
    try:
        raise RuntimeError('Failed "execute_batch"')
    except RuntimeError:
        logger.exception(message)


@pytest.fixture
def cygrpc() -> Iterator[logging.Logger]:
    logger = logging.getLogger("grpc._cython.cygrpc.test")
    logger.addFilter(ClientGoneFilter())
    yield logger
    logger.filters.clear()


def test_the_client_gone_error_is_not_logged_above_debug(
    cygrpc: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    log_to(cygrpc, MESSAGE)
    assert not caplog.records


def test_at_debug_it_is_one_line_without_a_traceback(
    cygrpc: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    log_to(cygrpc, MESSAGE)
    [record] = caplog.records
    assert record.levelno == logging.DEBUG
    assert record.exc_info is None
    assert record.getMessage().startswith(MESSAGE)
    assert "the client left" in record.getMessage()


def test_other_errors_of_grpc_are_left_alone(
    cygrpc: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    log_to(cygrpc, "Unexpected [RuntimeError] raised by servicer method [/lemonade.v1.Inference/Chat]")
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
