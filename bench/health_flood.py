"""What an anonymous caller can make the server hold through Health/Watch (issue 18 finding 3).

`--streams` Health Watch calls at once, each naming a service of
`--name-mib` MiB, against a server on a fake model (no token needed: Health
is open). Reports the server's RSS at rest, at its peak while the calls are
in flight (sampled every 10 ms), as they end and `--settle` seconds later
(the server gives freed heap memory back every 30 s), and how the calls
ended. Before the fix, 300 calls naming a 3 MiB service took the
server to 3.7 GB, 3.1 GB of which stayed after they were cancelled.

With `--baseline DIR`, the same flood is also run, in the same run, on a
server from another checkout (say the commit before the fix), and the
ratios are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from streams import serve

from lemonade_grpc.provision.tiny_model import ensure_tiny_model
from lemonade_grpc.testing import cpu_model

HERE = Path(__file__).resolve().parent
FAKE_BACKEND = HERE.parent / "tests" / "fake_backend.py"
MIB = 1 << 20


async def flood(
    address: str, pid: int, streams: int, name_bytes: int, hold: float, settle: float
) -> dict[str, Any]:
    """Open the streams, hold them `hold` seconds (or until they end), cancel; RSS before, peak, after."""
    server = psutil.Process(pid)
    before = server.memory_info().rss
    peak = before
    outcomes: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", 2 * name_bytes)]
    ) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # untyped stubs
        request = health_pb2.HealthCheckRequest(service="x" * name_bytes)
        calls = [stub.Watch(request) for _ in range(streams)]

        async def first(call: Any) -> None:
            try:
                await call.read()
                outcomes["answered, held open"] += 1
            except grpc.aio.AioRpcError as error:
                outcomes[error.code().name] += 1
            except asyncio.CancelledError:
                outcomes["still waiting when cancelled"] += 1

        reads = asyncio.gather(*(first(call) for call in calls))
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline and not reads.done():
            peak = max(peak, server.memory_info().rss)
            await asyncio.sleep(0.01)
        peak = max(peak, server.memory_info().rss)
        for call in calls:
            call.cancel()
        await reads
    await asyncio.sleep(1.0)  # the server sees the cancellations
    ended = server.memory_info().rss
    await asyncio.sleep(settle)  # the server's heap trimmer checks every 30 s
    after = server.memory_info().rss
    return {"before": before, "peak": peak, "ended": ended, "after": after, "outcomes": dict(outcomes)}


def run(checkout: Path | None, work: Path, label: str, args: argparse.Namespace) -> dict[str, Any]:
    config = work / f"{label}.toml"
    command = [sys.executable, str(FAKE_BACKEND), "--port", "{port}", "--model", "{path}"]
    config.write_text(
        f'[models.m]\nrecipe = "command"\npath = "{ensure_tiny_model()}"\n'
        f"command = [{', '.join(repr(part).replace(chr(39), chr(34)) for part in command)}]\n"
    )
    server = serve(work / f"state-{label}", config, log_path=work / f"{label}.log", cwd=checkout)
    process, address = server.process, server.address
    try:
        return asyncio.run(
            flood(address, process.pid, args.streams, int(args.name_mib * MIB), args.hold, args.settle)
        )
    finally:
        process.terminate()
        process.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--name-mib", type=float, default=3.0)
    parser.add_argument("--hold", type=float, default=10.0, help="seconds the streams are held open")
    parser.add_argument("--settle", type=float, default=35.0, help="seconds before the last RSS reading")
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    args = parser.parse_args()
    print(f"{args.streams} Health Watch streams naming a {args.name_mib:g} MiB service; {cpu_model()}")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [("this", None)] + ([("baseline", args.baseline)] if args.baseline else [])
        results = {label: run(checkout, Path(tmp), label, args) for label, checkout in runs}
    for label, result in results.items():
        before, peak, ended, after = (result[key] / MIB for key in ("before", "peak", "ended", "after"))
        print(
            f"{label:>8}: RSS {before:7.1f} MiB at rest, {peak:7.1f} at peak, {ended:7.1f} as the calls end,"
            f" {after:7.1f} {args.settle:g} s later; calls: {result['outcomes']}"
        )
    if args.baseline:
        this, base = results["this"], results["baseline"]

        def growth(result: dict[str, Any], key: str) -> int:
            return max(1, int(result[key] - result["before"]))

        print(
            f"   ratio (this / baseline): peak growth {growth(this, 'peak') / growth(base, 'peak'):.3f},"
            f" growth kept after {growth(this, 'after') / growth(base, 'after'):.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
