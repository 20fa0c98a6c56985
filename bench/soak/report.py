"""The run's summary: operations, errors, chaos, checks, the resource table and trend, the verdict."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import grpc

from lemonade_grpc.testing import cpu_model
from soak.processes import Resources
from soak.record import Record
from soak.server import MODELS, SLOTS, TYPE_OF

RESULTS = Path(__file__).resolve().parent.parent / "results"
# Resources with the pool empty, end vs baseline.
RSS_GROWTH_LIMIT = 0.10
FD_SLACK = 4
THREAD_SLACK = 2


def second_half(trend: list[tuple[float, Resources]]) -> str:
    """RSS over the second half of the samples under load: first, last, lowest, highest, rate."""
    half = trend[len(trend) // 2 :]
    if len(half) < 2:
        return "RSS over the second half: too few samples"
    (start, first), (end, last) = half[0], half[-1]
    mib = [r.rss_bytes / 2**20 for _, r in half]
    rate = (last.rss_bytes - first.rss_bytes) / 2**20 / max(1e-9, (end - start) / 60)
    return (
        f"RSS over the second half ({len(half)} samples, {(end - start) / 60:.1f} min):"
        f" {mib[0]:.1f} -> {mib[-1]:.1f} MiB, range {min(mib):.1f}-{max(mib):.1f}, {rate:+.3f} MiB/min"
    )


def compare(baseline: Resources | None, end: Resources | None, record: Record) -> list[str]:
    if baseline is None or end is None:
        record.violation("resources not measured (the pool never came to rest)")
        return []
    growth = (end.rss_bytes - baseline.rss_bytes) / baseline.rss_bytes
    record.check(
        f"resources: RSS growth < {RSS_GROWTH_LIMIT:.0%}",
        growth < RSS_GROWTH_LIMIT,
        f"RSS {baseline.rss_bytes / 2**20:.1f} -> {end.rss_bytes / 2**20:.1f} MiB ({growth:+.1%})",
    )
    record.check(
        f"resources: fds back to baseline ± {FD_SLACK}",
        abs(end.fds - baseline.fds) <= FD_SLACK,
        f"fds {baseline.fds} -> {end.fds}",
    )
    record.check(
        f"resources: threads back to baseline ± {THREAD_SLACK}",
        abs(end.threads - baseline.threads) <= THREAD_SLACK,
        f"threads {baseline.threads} -> {end.threads}",
    )
    return [
        "| | after warm-up | end | change |",
        "|---|---:|---:|---:|",
        f"| RSS | {baseline.rss_bytes / 2**20:.1f} MiB | {end.rss_bytes / 2**20:.1f} MiB | {growth:+.1%} |",
        f"| file descriptors | {baseline.fds} | {end.fds} | {end.fds - baseline.fds:+d} |",
        f"| threads | {baseline.threads} | {end.threads} | {end.threads - baseline.threads:+d} |",
    ]


def summary(args: argparse.Namespace, record: Record, table: list[str], wall: float) -> str:
    lines = [
        f"lemonade-grpc soak, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"machine: {os.cpu_count()} CPUs, {cpu_model()};"
        f" Python {platform.python_version()}, grpcio {grpc.__version__}",
        f"seed {args.seed}; {args.clients} clients; duration {args.duration:g} s; wall {wall:.0f} s",
        f"repeat: python bench/soak --seed {args.seed} --duration {args.duration:g}"
        f" --clients {args.clients}{' --unbounded' if args.unbounded else ''}",
        f"slots {SLOTS}; models {', '.join(f'{m} ({TYPE_OF[m]})' for m in MODELS)}",
        "",
        "operations (kind: outcome count):",
    ]
    kinds = sorted({kind for kind, _ in record.outcomes})
    total = sum(record.outcomes.values())
    for kind in kinds:
        parts = sorted(((o, n) for (k, o), n in record.outcomes.items() if k == kind), key=lambda p: -p[1])
        count = sum(n for _, n in parts)
        lines.append(f"  {kind:9} {count:6}  " + ", ".join(f"{o} {n}" for o, n in parts))
    lines.append(f"  {'total':9} {total:6}")
    lines += ["", "an example of each error (the call, the status message):"]
    lines += [f"  {outcome}: {example}" for outcome, example in sorted(record.examples.items())]
    lines += ["", "chaos: " + (", ".join(f"{k} {n}" for k, n in sorted(record.kills.items())) or "none")]
    lines += ["", "invariant checks:"]
    lines += [f"  {name} {n}" for name, n in sorted(record.checks.items()) if n]
    lines += ["", "server resources, pool empty and clients idle (medians of 5 reads):", *table]
    lines += ["", "notes:", *(f"  {note}" for note in record.notes)]
    lines += ["", f"violations: {len(record.violations)}", *(f"  {v}" for v in record.violations[:50])]
    if len(record.violations) > 50:
        lines.append(f"  ... and {len(record.violations) - 50} more")
    lines.append("RESULT: " + ("PASS" if not record.violations else "FAIL"))
    return "\n".join(lines) + "\n"
