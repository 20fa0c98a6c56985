"""What a value may be: every number's range, the model-name rule, and how echoed input is cut.

Nothing a client sends is trusted (DESIGN.md lesson 10), and an operator's
typo should be caught at start-up, not when a derived time overflows (issue
#9 finding 4: an `idle_unload_seconds` of 7.9e9 made every later Status answer
UNKNOWN "Timestamp is not valid"). Each range is written here once; the
config, the request validation and the state file all check against it, and
docs/configuration.md lists them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DAY = 86_400
YEAR = 365 * DAY


@dataclass(frozen=True, slots=True)
class Range:
    """An inclusive range of numbers. `str()` gives it as documentation writes it."""

    low: float
    high: float

    def __contains__(self, value: object) -> bool:
        return (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and value == value  # not NaN
            and self.low <= value <= self.high
        )

    def __str__(self) -> str:
        return f"{_number(self.low)}..{_number(self.high)}"


def _number(value: float) -> str:
    """`value` as a person writes it: 16777216, 0.1, never 1.67772e+07."""
    return str(int(value)) if value == int(value) else repr(value)


# Load options (requests, the catalog, the state file).
CTX_SIZE = Range(1, 1 << 24)
IDLE_UNLOAD_SECONDS = Range(0, YEAR)  # 0 = never
BACKEND_ARGS_COUNT = 64
BACKEND_ARGS_BYTES = 4096  # all the arguments of one request together, UTF-8
BACKEND_ARG_BYTES = 1024  # one argument

# [pool]
MAX_LOADED = Range(1, 64)
HEALTH_TIMEOUT_SECONDS = Range(0.1, DAY)
GRACE_SECONDS = Range(0, 3_600)  # stop_grace_seconds, evict_grace_seconds, shutdown_grace_seconds
MEMORY_RESERVE_MB = Range(0, 1 << 24)
CHECK_SECONDS = Range(0, 3_600)  # memory_check_seconds, health_check_seconds: 0 = off
HEALTH_CHECK_TIMEOUT_SECONDS = Range(0.1, 3_600)
HEALTH_CHECK_FAILURES = Range(1, 100)
BACKOFF_SECONDS = Range(0, DAY)  # restart_backoff_seconds, restart_backoff_max_seconds
MAX_RESTARTS = Range(0, 1_000)
RESTART_WINDOW_SECONDS = Range(0, YEAR)
PROGRESS_SECONDS = Range(0.01, 60)

# [limits]
MAX_STREAMS = Range(1, 65_536)  # max_streams, max_streams_per_model
MAX_QUEUED_STREAMS = Range(0, 1_000_000)
MAX_QUEUED_LOADS = Range(1, 10_000)
WATCH_QUEUE_EVENTS = Range(1, 1_000_000)
MAX_WATCH_STREAMS = Range(1, 65_536)  # max_watch_streams, max_health_watch_streams
MAX_CONNECTIONS = Range(0, 1 << 20)  # 0: derived from the descriptor limit
HANDSHAKE_TIMEOUT_SECONDS = Range(0.1, 3_600)
STREAM_INTERVAL_MS = Range(0, 1_000)

# [backend_logs] (MiB)
LOG_FILE_MB = Range(1, 1 << 20)  # max_file_mb
LOG_TOTAL_MB = Range(1, 1 << 24)  # max_total_mb
LOG_MIN_FREE_MB = Range(0, 1 << 24)  # min_free_mb: 0 = write until the disk is full

# Inference requests.
MAX_TOKENS = Range(1, 1 << 20)
TOP_K = Range(0, 1 << 20)
TOP_LOGPROBS = Range(0, 20)  # alternatives per token with `logprobs`
STOP_STRINGS = 16
STOP_STRING_BYTES = 256  # one stop string, UTF-8
EMBED_INPUTS = Range(1, 1024)  # texts of one Embed
TOKEN_IDS = 1 << 20  # ids of one Detokenize
# The optional sampling floats: (field, low, high, low inclusive); the high end is inclusive.
SAMPLING_FLOATS: tuple[tuple[str, float, float, bool], ...] = (
    ("temperature", 0.0, 100.0, True),
    ("top_p", 0.0, 1.0, False),
    ("min_p", 0.0, 1.0, True),
    ("repeat_penalty", 0.0, 10.0, True),
    ("presence_penalty", -2.0, 2.0, True),
    ("frequency_penalty", -2.0, 2.0, True),
)

# A model name: letters, digits and `._:-`, starting with a letter or digit,
# at most 128 characters. One rule for the catalog and for requests; it is
# also safe as a file name (backend logs are named after models).
MODEL_NAME_LENGTH = 128
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

# How much of a client's input an error message may quote.
ECHO_CHARACTERS = 64


def model_name_problem(name: str) -> str | None:
    """Why `name` is not a valid model name, or None when it is. Pure."""
    if MODEL_NAME.fullmatch(name):
        return None
    if not name:
        return "is required"
    if len(name) > MODEL_NAME_LENGTH:
        return f"is {len(name):,} characters long; at most {MODEL_NAME_LENGTH} are allowed"
    return (
        f"{echo(name)} is not a model name: letters, digits and . _ : - only, starting with a letter or digit"
    )


def echo(value: str, limit: int = ECHO_CHARACTERS) -> str:
    """`value` quoted for an error message, cut to `limit` characters with its full length said."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value):,} characters)"
