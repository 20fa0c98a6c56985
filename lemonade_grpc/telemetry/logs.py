"""Log lines: plain text for people, JSON lines for machines; trace ids when a span is active.

`configure(format, level)` installs one handler on the root logger (stderr).
A record may carry `extra={"fields": {...}}`: the JSON format puts those
fields at the top level of its line (model, reason, pid, seconds…), the
plain one leaves them out (its message says the same in words).

Nothing here reads request metadata or configuration: tokens cannot reach a
log line through it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from typing import Any, TextIO

import orjson
from opentelemetry import trace

from lemonade_grpc.core.settings import LogFormat

_PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(trace)s"


def _trace_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the span active here, if any and valid."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class PlainFormatter(logging.Formatter):
    """The classic line, with ` trace_id=… span_id=…` appended inside a span."""

    def __init__(self) -> None:
        super().__init__(_PLAIN_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        ids = _trace_ids()
        record.trace = f" trace_id={ids[0]} span_id={ids[1]}" if ids else ""
        return super().format(record)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, trace ids, fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ids = _trace_ids()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(line, default=str).decode()
        except orjson.JSONEncodeError:
            # A lone surrogate (a path that is not UTF-8, decoded with surrogateescape):
            # the standard library escapes it, orjson refuses it.
            return json.dumps(line, default=str, ensure_ascii=False, separators=(",", ":"))


def _timestamp(created: float) -> str:
    """RFC 3339 in UTC with milliseconds: 2026-11-29T21:30:00.123Z."""
    seconds = int(created)
    milliseconds = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{milliseconds:03d}Z"


# What gRPC's core (absl) writes to file descriptor 2: "I1129 22:12:52.909311   15094 file.cc:1403] text".
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]]+)\] ?(.*)$")
_ABSL_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
_stderr: TextIO | None = None  # the real standard error, once file descriptor 2 is a pipe to us


def _pump(read_end: int) -> None:
    """Log each line written to file descriptor 2 (C libraries, bare prints), until it is closed."""
    core = logging.getLogger("grpc.core")
    other = logging.getLogger("stderr")
    with os.fdopen(read_end, "rb") as pipe:
        for raw in pipe:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if not line.strip():
                continue
            match = _ABSL_LINE.match(line)
            if match:
                core.log(
                    _ABSL_LEVELS[match.group(1)],
                    "%s",
                    match.group(3),
                    extra={"fields": {"source": match.group(2)}},
                )
            else:
                other.warning("%s", line)


def _capture_stderr() -> TextIO:
    """Make file descriptor 2 a pipe whose lines are logged; return the real standard error.

    For JSON logs: gRPC's core writes its own lines (a GOAWAY from a
    collector going away, say) to file descriptor 2, past Python's logging,
    and they broke the one-object-per-line stream. Python's `sys.stderr` is
    on the same descriptor, so a bare print or a traceback becomes a JSON
    line too.
    """
    global _stderr
    if _stderr is None:
        real = os.dup(2)
        read_end, write_end = os.pipe()
        sys.stderr.flush()
        os.dup2(write_end, 2)
        os.close(write_end)
        _stderr = os.fdopen(real, "w", buffering=1, encoding="utf-8", errors="backslashreplace")
        threading.Thread(target=_pump, args=(read_end,), name="stderr-to-log", daemon=True).start()
    return _stderr


def json_enabled() -> bool:
    """Whether the root logger writes JSON lines."""
    return any(isinstance(h.formatter, JSONFormatter) for h in logging.getLogger().handlers)


class ClientGoneFilter(logging.Filter):
    """grpc.aio's ERROR "ExecuteBatchError raised in core by servicer method", made a DEBUG line.

    gRPC core refuses to send a message on a call its client has just
    cancelled (or whose deadline has just passed) and grpc.aio logs that
    with a traceback (grpc/grpc#32551): nothing is wrong, the client left
    as the answer went out, and it already has its CANCELLED or
    DEADLINE_EXCEEDED. The soak (issue 13) saw one or two per thousand
    calls given up within milliseconds. Kept, without the traceback, at
    DEBUG.
    """

    MARK = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not str(record.msg).startswith(self.MARK):
            return True
        record.msg = f"{record.getMessage()}: the client left as its answer was being sent"
        record.args = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = record.exc_text = None
        return logging.getLogger().isEnabledFor(logging.DEBUG)


CLIENT_GONE = ClientGoneFilter()


def configure(log_format: LogFormat, level: str) -> None:
    """Send every log record to stderr in `log_format`, at `level` and above (replaces earlier set-up)."""
    handler = logging.StreamHandler(_capture_stderr() if log_format == "json" else _stderr or sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else PlainFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    cygrpc = logging.getLogger("grpc._cython.cygrpc")
    if CLIENT_GONE not in cygrpc.filters:
        cygrpc.addFilter(CLIENT_GONE)
    # Python warnings through the same handler: a bare line on stderr would break a JSON stream.
    logging.captureWarnings(True)
