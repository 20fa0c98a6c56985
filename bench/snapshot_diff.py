"""`python bench/snapshot_diff.py DIR [N]`: what grew between two tracemalloc snapshots of a traced run.

Compares the snapshot nearest the middle of the run with the last one
(the second half, after warm-up and the event ring's filling), grouped by
the innermost frame of ours where one exists, and prints the N (20)
largest growths with their counts; then the totals.
"""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path


def main() -> int:
    files = sorted(Path(sys.argv[1]).glob("snapshot-*.pickle"))
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    if len(files) < 2:
        print("fewer than two snapshots", file=sys.stderr)
        return 1
    first, last = files[len(files) // 2], files[-1]
    old, new = tracemalloc.Snapshot.load(str(first)), tracemalloc.Snapshot.load(str(last))
    print(f"{first.name} -> {last.name}")
    for key in ("lineno", "traceback"):
        print(f"\nby {key}:")
        for stat in new.compare_to(old, key)[:top]:
            where = stat.traceback.format()[-1].strip()
            print(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d}  {where}")
            if key == "traceback":
                for line in stat.traceback.format(limit=-8)[:-1]:
                    print("        " + line.strip())
    total_old = sum(s.size for s in old.statistics("filename"))
    total_new = sum(s.size for s in new.statistics("filename"))
    print(f"\ntraced: {total_old / 2**20:.2f} -> {total_new / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
