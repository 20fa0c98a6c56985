"""What an HTTP server library would add to the serving process's RSS (issue 21, the OpenAI face).

`python bench/http_import.py --site DIR [--rounds N]` imports, in a fresh
interpreter each round, the modules the server already loads (grpc, the
pool, the backends, the metrics endpoint), then one candidate library
taken from DIR (a site-packages directory holding it), alternating the
order, and prints the median RSS the library adds. DIR: `python -m venv
/tmp/v && /tmp/v/bin/pip install uvicorn==0.54.0 starlette==1.10.0
aiohttp==3.14.5` and its `lib/python3.11/site-packages`. None of them is a
dependency of the project; this measures which one could be, against the
endpoint's budget (the control plane at most 50 MiB with it on).
"""

from __future__ import annotations

import argparse
import sys

from interpreters import medians

CODE = """
import sys
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
import lemonade_grpc.server, lemonade_grpc.telemetry.prometheus, lemonade_grpc.backends.backend
before = rss()
sys.path.append({site!r})
{extra}
print(before, rss() - before)
"""
CANDIDATES = {
    "nothing (the server's modules)": "",
    "uvicorn (an ASGI server, httptools)": "import uvicorn",
    "uvicorn + starlette": "import uvicorn, starlette.applications, starlette.responses",
    "aiohttp.web": "import aiohttp.web",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--site", required=True, help="a site-packages directory holding the candidates")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    programs = {name: CODE.format(site=args.site, extra=extra) for name, extra in CANDIDATES.items()}
    results = medians(sys.executable, programs, args.rounds)
    print(f"{args.rounds} fresh interpreters each, alternating; medians")
    print("| imported on top of the server's modules | server modules' RSS | added |")
    print("|---|---:|---:|")
    for name, (base_mib, added) in results.items():
        print(f"| {name} | {base_mib:.1f} MiB | +{added:.1f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
