"""How the CLI shows things to people: the status table and the load progress line. Pure functions.

Colours (ANSI) only when asked, which the CLI does only on a terminal.
"""

from __future__ import annotations

from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb

_STATE_COLOURS = {
    pb.MODEL_STATE_READY: "32",  # green
    pb.MODEL_STATE_LOADING: "33",  # yellow
    pb.MODEL_STATE_UNLOADING: "33",
    pb.MODEL_STATE_FAILED: "31",  # red
}
HEADERS = ("NAME", "STATE", "PINNED", "PID", "MEMORY", "IN FLIGHT", "IDLE UNLOAD IN")


def clean(text: str) -> str:
    """`text` safe for a terminal line: control characters (escape sequences, newlines) shown escaped.

    Messages can quote a backend's own output (a failed start's log tail):
    printed raw, its escape sequences would reach the operator's terminal
    (issue 12: a title change, a cleared screen, a fake prompt).
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def paint(text: str, code: str, colour: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if colour and code else text


def size(nbytes: int) -> str:
    """`nbytes` as a person reads it: 612 MiB, 1.5 GiB, 800 KiB."""
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):.1f} GiB"
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.0f} MiB"
    return f"{nbytes / 1024:.0f} KiB" if nbytes else "-"


def duration(seconds: float) -> str:
    """A time left, to the second: 45s, 4m 05s, 2h 10m."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    return f"{whole // 3600}h {whole % 3600 // 60:02d}m"


def idle_unload_in(model: pb.ModelStatus, now: float) -> str:
    if model.pinned:
        return "never (pinned)"
    if model.in_flight:
        return "busy"
    if not model.HasField("idle_unload_at"):
        return "never"
    return duration(model.idle_unload_at.ToMicroseconds() / 1e6 - now)


def status_table(pool: pb.PoolStatus, now: float, *, colour: bool = False) -> str:
    """The models of `pool` as a table, like `ollama ps`; `now` is the wall-clock time in seconds."""
    if not pool.models:
        return "no models loaded"
    rows = [
        (
            model.name,
            pb.ModelState.Name(model.state).removeprefix("MODEL_STATE_").lower(),
            "yes" if model.pinned else "no",
            str(model.pid) if model.pid else "-",
            size(model.rss_bytes),
            str(model.in_flight),
            idle_unload_in(model, now),
        )
        for model in pool.models
    ]
    widths = [max(len(row[i]) for row in (HEADERS, *rows)) for i in range(len(HEADERS))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True)).rstrip()]
    for model, row in zip(pool.models, rows, strict=True):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        cells[1] = paint(cells[1], _STATE_COLOURS.get(model.state, ""), colour)
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


BAR_WIDTH = 24


def phase_name(phase: int) -> str:
    return pb.LoadPhase.Name(phase).removeprefix("LOAD_PHASE_")  # type: ignore[arg-type]


def progress_line(progress: pb.LoadResponse | pb.LoadProgress) -> str:
    """One load progress message as a line: `LOADING 40% reading weights: 160 of 395 MiB`."""
    fraction = f" {progress.fraction:.0%}" if progress.fraction >= 0 else ""
    queued = getattr(progress, "queue_position", 0)
    position = f" (position {queued})" if queued else ""
    return f"{phase_name(progress.phase)}{fraction}{position} {clean(progress.message)}".rstrip()


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """`[#########...............]` for `fraction` in [0, 1]; a blank bar when unknown (negative)."""
    filled = round(min(1.0, fraction) * width) if fraction >= 0 else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def progress_bar(progress: pb.LoadResponse, *, colour: bool = False) -> str:
    """The live line of `load` on a terminal: `LOADING   [#####.....]  45%  reading weights: ...`."""
    phase = paint(f"{phase_name(progress.phase):<9}", "1", colour)
    percent = f"{progress.fraction:4.0%}" if progress.fraction >= 0 else "  --"
    position = f" (position {progress.queue_position})" if progress.queue_position else ""
    return f"{phase} {bar(progress.fraction)} {percent}{position}  {clean(progress.message)}".rstrip()


def watch_line(event: pb.WatchResponse) -> str:
    """One Watch event as a short line for people: `#12 tiny LOADING 45% reading weights ...`."""
    which = event.WhichOneof("event")
    head = f"#{event.sequence}"
    if which == "load_progress":
        progress = event.load_progress
        return f"{head} {progress.model} {progress_line(progress)}"
    if which == "model_loaded":
        status = event.model_loaded.status
        return f"{head} {status.name} loaded (pid {status.pid}, {size(status.rss_bytes)})"
    if which == "model_updated":
        status = event.model_updated.status
        idle = status.options.idle_unload_seconds if status.options.HasField("idle_unload_seconds") else None
        pinned = ", pinned" if status.pinned else ""
        unload = f"idle unload after {idle} s" if idle else "no idle unload"
        return f"{head} {status.name} updated in place (pid {status.pid}, {unload}{pinned})"
    if which == "model_unloaded":
        gone = event.model_unloaded
        reason = pb.UnloadReason.Name(gone.reason).removeprefix("UNLOAD_REASON_").lower()
        return f"{head} {gone.model} unloaded ({reason}){': ' + clean(gone.message) if gone.message else ''}"
    if which == "snapshot":
        names = ", ".join(
            f"{m.name} ({pb.ModelState.Name(m.state).removeprefix('MODEL_STATE_').lower()})"
            for m in event.snapshot.models
        )
        return f"{head} {'resync' if event.resync else 'snapshot'}: {names or 'no models'}"
    if which is None:
        return head
    detail = getattr(event, which)
    fields = " ".join(
        f"{field.name}={value}" for field, value in detail.ListFields() if not isinstance(value, bytes)
    )
    return clean(f"{head} {which} {fields}".rstrip())


def plan_text(plan: pb.PlanResponse) -> str:
    """A Plan answer in a few lines for people."""
    outcome = pb.PlanOutcome.Name(plan.outcome).removeprefix("PLAN_OUTCOME_")
    lines = [f"{outcome}: {clean(plan.message)}"]
    if plan.need_bytes:
        lines.append(
            f"memory: needs {size(plan.need_bytes)}, {size(plan.available_bytes)} available,"
            f" {size(plan.reserve_bytes)} kept in reserve"
        )
    if plan.loads_ahead:
        lines.append(f"{plan.loads_ahead} load(s) ahead of it; they may change this plan")
    return "\n".join(lines)
