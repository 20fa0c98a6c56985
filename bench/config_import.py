"""What a validation library would add to the server's start: import time and RSS (issue 20).

`python bench/config_import.py [--python PY] [--rounds N]` imports, in a
fresh interpreter each round, `tomllib` alone (what `config.py` parses
with), then with msgspec (0.22) and with pydantic-settings, alternating
the order, and prints the median import time and RSS growth of each. PY
must have the libraries: `python -m venv /tmp/v && /tmp/v/bin/pip install
msgspec==0.22.0 pydantic-settings` (neither is a dependency of the
project; this measures whether one should be).
"""

from __future__ import annotations

import argparse
import sys

from interpreters import medians

CODE = """
import time
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
before, started = rss(), time.perf_counter()
import tomllib
{extra}
print((time.perf_counter() - started) * 1000, (rss() - before) / 2**20)
"""
VARIANTS = {
    "tomllib (today)": "",
    "tomllib + msgspec": "import msgspec, msgspec.toml",
    "tomllib + pydantic-settings": "import pydantic_settings",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    results = medians(
        args.python, {name: CODE.format(extra=extra) for name, extra in VARIANTS.items()}, args.rounds
    )
    print(f"{args.rounds} fresh interpreters each, alternating; medians")
    print("| imports | time | RSS growth |")
    print("|---|---:|---:|")
    for name, (time_ms, growth) in results.items():
        print(f"| {name} | {time_ms:.1f} ms | +{growth:.2f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
