"""What the run counts and the violations it finds; how a failed call is judged.

`Record` (outcomes, kills, checks, notes, violations, printed as found) and
`classify`: a failed RPC's (code, ErrorInfo reason) must be one of
docs/api.md's pairs and one a valid request of this soak can get; never
INTERNAL or UNKNOWN; a patient call that hits its deadline is a hang.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

DOMAIN = "lemonade.v1"
# Every (code, reason) pair docs/api.md lists; those a valid request of this soak may get.
KNOWN = {
    (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
    (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_OPTIONS"),
    (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST"),
    (grpc.StatusCode.INVALID_ARGUMENT, "BACKEND_REJECTED"),
    (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
    (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_NOT_LOADED"),
    (grpc.StatusCode.FAILED_PRECONDITION, "SLOTS_PINNED"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_MEMORY"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_RESOURCES_EXHAUSTED"),
    (grpc.StatusCode.ABORTED, "LOAD_CANCELLED"),
    (grpc.StatusCode.ABORTED, "MODEL_EVICTED"),
    (grpc.StatusCode.ABORTED, "SHUTTING_DOWN"),
    (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN"),
    (grpc.StatusCode.UNAVAILABLE, "BACKEND_START_FAILED"),
    (grpc.StatusCode.UNAVAILABLE, "BACKEND_CRASHED"),
    (grpc.StatusCode.UNAVAILABLE, "BACKEND_ERROR"),
    (grpc.StatusCode.UNAVAILABLE, "STATE_WRITE_FAILED"),
    (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    (grpc.StatusCode.INTERNAL, "INTERNAL_ERROR"),
}
# Reasons a well-formed request to this server can meet while the pool churns and backends die.
EXPECTED = {
    "MODEL_NOT_LOADED",
    "SLOTS_PINNED",
    "OVERLOADED",
    "LOAD_CANCELLED",
    "MODEL_EVICTED",
    "BACKEND_START_FAILED",
    "BACKEND_CRASHED",
    "BACKEND_ERROR",
}
# With --memory-headroom-mb the reserve bites: loads may not fit.
MEMORY_REASONS = {"INSUFFICIENT_MEMORY"}
# Client-side endings: no ErrorInfo to expect.
CLIENT_CODES = {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
# A call given this long (no client-side giving up meant) that has not ended is a hang.
PATIENT_SECONDS = 120.0


@dataclasses.dataclass
class Record:
    """Everything the run counts and every violation it finds."""

    started: float = dataclasses.field(default_factory=time.monotonic)
    outcomes: Counter[tuple[str, str]] = dataclasses.field(default_factory=Counter)
    violations: list[str] = dataclasses.field(default_factory=list)
    kills: Counter[str] = dataclasses.field(default_factory=Counter)
    checks: Counter[str] = dataclasses.field(default_factory=Counter)
    notes: list[str] = dataclasses.field(default_factory=list)
    memory_reasons: bool = False
    # The first message of each error outcome, for the summary.
    examples: dict[str, str] = dataclasses.field(default_factory=dict)

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.started:7.1f}s"

    def violation(self, text: str) -> None:
        line = f"[{self.elapsed()}] {text}"
        self.violations.append(line)
        print(f"VIOLATION {line}", flush=True)

    def note(self, text: str) -> None:
        line = f"[{self.elapsed()}] {text}"
        self.notes.append(line)
        print(line, flush=True)

    def check(self, name: str, ok: bool, failure: str) -> None:
        self.checks[f"{name}: {'passed' if ok else 'failed'}"] += 1
        if not ok:
            self.violation(f"{name}: {failure}")


def error_reason(error: grpc.aio.AioRpcError) -> str | None:
    """The ErrorInfo reason in the trailers of `error`, None when there is none."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # typed for sync calls, works for aio
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and detail.Unpack(info):
            return info.reason if info.domain == DOMAIN else f"(domain {info.domain!r}) {info.reason}"
    return None


def classify(error: grpc.aio.AioRpcError, record: Record, what: str, patient: bool) -> str:
    """The outcome name of a failed call; a violation when the error breaks the contract."""
    code = error.code()
    if code in CLIENT_CODES:
        if patient and code is grpc.StatusCode.DEADLINE_EXCEEDED:
            record.violation(f"{what}: no end within {PATIENT_SECONDS:g} s (a hang)")
        return code.name
    reason = error_reason(error)
    outcome = f"{code.name}/{reason}"
    message = (error.details() or "")[:200]
    record.examples.setdefault(outcome, f"{what}: {message}")
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        record.violation(f"{what}: {outcome}: {message}")
    elif reason is None:
        record.violation(f"{what}: {code.name} without an ErrorInfo: {message}")
    elif (code, reason) not in KNOWN:
        record.violation(f"{what}: {outcome} is not a (code, reason) pair of docs/api.md: {message}")
    elif reason not in EXPECTED and not (record.memory_reasons and reason in MEMORY_REASONS):
        record.violation(f"{what}: {outcome} for a valid request: {message}")
    return outcome
