"""`python bench/soak`: the arguments and bounds; the server started, the soak run, the summary written.

Also `python -m soak` with bench/ on the path. Whatever happens, everything
the server started is killed at the end; the exit status is 1 on any
violation. What the soak does: the package's docstring.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # `python bench/soak` puts bench/soak on the path, where the package is bench/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import datetime
import random
import shutil
import tempfile
import time

import soak
from lemonade_grpc.provision.tiny_model import ensure_tiny_model
from soak.record import Record
from soak.report import RESULTS, compare, summary
from soak.run import run
from soak.server import start_server, write_config

# The whole run, start to exit, must end within this (issue 13: 10 minutes).
BUDGET_SECONDS = 600.0
# Startup, two quiet measurements, the final checks and the shutdown: at most this much.
OVERHEAD_SECONDS = 110.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/soak", description=soak.__doc__.split("\n")[0] if soak.__doc__ else None
    )
    parser.add_argument("--duration", type=float, default=480.0, help="seconds of load (warm-up included)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None, help="random by default; printed")
    parser.add_argument("--check-interval", type=float, default=4.0)
    parser.add_argument(
        "--memory-headroom-mb",
        type=int,
        default=None,
        help="set the memory reserve this far below what is free now, so that loads evict for memory",
    )
    parser.add_argument("--output", type=Path, default=None, help="default: bench/results/soak-DATE.txt")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (server log, state)")
    parser.add_argument(
        "--trend-every", type=float, default=30.0, help="seconds between RSS samples under load (default 30)"
    )
    parser.add_argument(
        "--tracemalloc",
        type=Path,
        default=None,
        metavar="DIR",
        help="run the server under bench/traced_server.py: tracemalloc snapshots every 30 s into DIR"
        " (compare them with bench/snapshot_diff.py; RSS then includes tracemalloc's own)",
    )
    parser.add_argument(
        "--unbounded",
        action="store_true",
        help="allow a --duration beyond the 10-minute bound (an investigative run; not `make soak`)",
    )
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 2**31)
    if args.trend_every <= 0:
        parser.error("--trend-every must be positive")
    args.budget = BUDGET_SECONDS
    if args.unbounded:
        if args.duration < 10:
            parser.error("--duration must be at least 10")
        args.budget = args.duration + OVERHEAD_SECONDS + 15
    elif not 10 <= args.duration <= BUDGET_SECONDS - OVERHEAD_SECONDS:
        parser.error(
            f"--duration must be in 10..{BUDGET_SECONDS - OVERHEAD_SECONDS:g} (10 minutes in all;"
            " --unbounded for a longer investigative run)"
        )
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(f"soak: seed {args.seed}, {args.clients} clients, {args.duration:g} s", flush=True)
    record = Record(memory_reasons=args.memory_headroom_mb is not None)
    workdir = Path(tempfile.mkdtemp(prefix="lemonade-soak-"))
    config = write_config(workdir, ensure_tiny_model(), args.memory_headroom_mb)
    server = start_server(workdir, config, args.tracemalloc)
    record.note(f"server pid {server.process.pid} on {server.address}; work dir {workdir}")
    table: list[str] = []
    started = time.monotonic()
    try:
        baseline, end = asyncio.run(
            asyncio.wait_for(
                run(args, record, server), args.budget - (time.monotonic() - record.started) - 15
            )
        )
        table = compare(baseline, end, record)
    except TimeoutError:
        record.violation(f"the soak overran its budget ({args.budget:g} s)")
    except Exception as error:  # a failure of the soak itself still reports and cleans up
        record.violation(f"the soak stopped on {type(error).__name__}: {error}")
    finally:
        leftovers = server.kill_everything()
        if leftovers:
            record.violation(f"killed at cleanup: {leftovers}")
    text = summary(args, record, table, time.monotonic() - started)
    output = args.output or RESULTS / f"soak-{datetime.date.today().isoformat()}.txt"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print()
    print(text, end="")
    print(f"(written to {output})")
    if record.violations or args.keep:
        print(f"server log and state kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if record.violations else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
