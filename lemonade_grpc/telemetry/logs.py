"""Log lines: plain text for people, JSON lines for machines; trace ids when a span is active.

`configure(format, level)` installs one handler on the root logger (stderr).
A record may carry `extra={"fields": {...}}`: the JSON format puts those
fields at the top level of its line (model, reason, pid, seconds…), the
plain one leaves them out (its message says the same in words).

Nothing here reads request metadata or configuration: tokens cannot reach a
log line through it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal

import orjson
from opentelemetry import trace

LogFormat = Literal["plain", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("plain", "json")

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
        return orjson.dumps(line, default=str).decode()


def _timestamp(created: float) -> str:
    """RFC 3339 in UTC with milliseconds: 2026-11-29T21:30:00.123Z."""
    seconds = int(created)
    milliseconds = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{milliseconds:03d}Z"


def configure(log_format: LogFormat, level: str) -> None:
    """Send every log record to stderr in `log_format`, at `level` and above (replaces earlier set-up)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else PlainFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Python warnings through the same handler: a bare line on stderr would break a JSON stream.
    logging.captureWarnings(True)
