"""Where a running process's resident memory is, by kind of mapping, sampled over time.

Reads `/proc/PID/smaps` every `--every` seconds (from outside: the process
is not touched) and sorts each mapping's RSS into

  heap      glibc's main arena (`[heap]`, grown with brk);
  arenas    glibc's per-thread arenas: 64 MiB reserved each, the part in use
            read-write and the rest `---p` right after it;
  stack     the main stack and thread stacks (anonymous, 8 MiB);
  files     file-backed mappings (the interpreter, shared libraries,
            gRPC's core);
  anon      every other anonymous mapping: CPython's object allocator
            (pymalloc's 1 MiB arenas, which the kernel merges into larger
            mappings), malloc blocks large enough for mmap, gRPC's own.

Prints a line per sample, then the mappings whose RSS grew most between
the first sample and the last. For issue 18 finding 15 (what the soak's slow
RSS rise is made of), run beside `bench/soak` with the server's pid.
Usage: `python bench/smaps.py PID [--every S] [--top N]`; stops when the
process exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from dataclasses import dataclass

KINDS = ("heap", "arenas", "stack", "files", "anon")
HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")
STACK_KB = 8192
ARENA_KB = 64 * 1024  # glibc's HEAP_MAX_SIZE on 64-bit


@dataclass(frozen=True)
class Mapping:
    start: int
    size_kb: int
    perms: str
    name: str
    rss_kb: int
    kind: str = "anon"


def kind_of(mapping: Mapping, after: Mapping | None) -> str:
    """What `mapping` is (`KINDS`); `after` is the mapping that follows it, if any."""
    if mapping.name == "[heap]":
        return "heap"
    if mapping.name == "[stack]" or (not mapping.name and mapping.size_kb == STACK_KB):
        return "stack"
    if mapping.name.startswith("/"):
        return "files"
    if (
        not mapping.name
        and mapping.perms.startswith("rw")
        and after is not None
        and not after.name
        and after.perms.startswith("---")
        and after.start == mapping.start + mapping.size_kb * 1024
        and mapping.size_kb + after.size_kb == ARENA_KB
    ):
        return "arenas"
    return "anon"


def read_smaps(pid: int) -> list[Mapping]:
    """The mappings of `pid` with their RSS; raises OSError when it is gone."""
    mappings: list[Mapping] = []
    header: tuple[int, int, str, str] | None = None
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            match = HEADER.match(line)
            if match:
                start, end = int(match.group(1), 16), int(match.group(2), 16)
                header = (start, (end - start) // 1024, match.group(3), match.group(4).strip())
            elif line.startswith("Rss:") and header is not None:
                mappings.append(Mapping(*header, int(line.split()[1])))
    return [
        dataclasses.replace(m, kind=kind_of(m, after))
        for m, after in zip(mappings, [*mappings[1:], None], strict=True)
    ]


def by_kind(mappings: list[Mapping]) -> dict[str, int]:
    totals = dict.fromkeys(KINDS, 0)
    for mapping in mappings:
        totals[mapping.kind] += mapping.rss_kb
    return totals


def line(elapsed: float, mappings: list[Mapping]) -> str:
    totals = by_kind(mappings)
    kinds = "  ".join(f"{kind} {totals[kind] / 1024:6.2f}" for kind in KINDS)
    arenas = sum(1 for m in mappings if m.kind == "arenas")
    return f"{elapsed:7.1f}s  RSS {sum(totals.values()) / 1024:6.2f} MiB  {kinds}  ({arenas} thread arenas)"


def growth(first: list[Mapping], last: list[Mapping], top: int) -> list[str]:
    """The `top` mappings (by start address) whose RSS grew most, new ones counted from zero."""
    before = {m.start: m.rss_kb for m in first}
    grown = sorted(last, key=lambda m: m.rss_kb - before.get(m.start, 0), reverse=True)[:top]
    return [
        f"  {m.start:#x} {m.size_kb:>8} kB {m.perms} {m.kind:7} {m.name or '(anonymous)'}:"
        f" {before.get(m.start, 0)} -> {m.rss_kb} kB"
        for m in grown
        if m.rss_kb > before.get(m.start, 0)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pid", type=int)
    parser.add_argument("--every", type=float, default=30.0)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    started = time.monotonic()
    first = last = read_smaps(args.pid)
    print(line(0.0, first), flush=True)
    while True:
        time.sleep(args.every)
        try:
            sample = read_smaps(args.pid)
        except OSError:
            break
        if not sample:  # a zombie: its mappings are gone
            break
        last = sample
        print(line(time.monotonic() - started, last), flush=True)
    print("grew most, first sample to last:")
    print("\n".join(growth(first, last, args.top)) or "  nothing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
