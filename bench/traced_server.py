"""`python bench/traced_server.py DIR serve ...`: the server with tracemalloc on, a snapshot every 30 s.

An investigative wrapper for `bench/soak --tracemalloc DIR` (issue 18
finding 15): the snapshots (`DIR/snapshot-SECONDS.pickle`, 25 frames a
trace, each after a full collection: live objects only) are compared by
`bench/snapshot_diff.py` to see what Python memory grows over a run.
tracemalloc costs time and memory of its own, and the collections change
when memory is freed: RSS and timings of such a run are not the product's.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import tracemalloc
from pathlib import Path

EVERY_SECONDS = 30.0


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(25)
    started = time.monotonic()

    def snapshots() -> None:
        while True:
            time.sleep(EVERY_SECONDS)
            # Live objects only: what a cycle still holds until the next full collection is not growth.
            gc.collect()
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
            snapshot.dump(str(out / f"snapshot-{time.monotonic() - started:06.0f}.pickle"))

    threading.Thread(target=snapshots, daemon=True, name="tracemalloc-snapshots").start()
    from lemonade_grpc.cli.main import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
