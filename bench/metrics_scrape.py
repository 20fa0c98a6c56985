"""What scraping `/metrics` does to Pin and Load (issue 18, finding 4), side by side in one run.

A server with a Prometheus endpoint (the tiny model on a real llama-server,
`--threads 1`) is measured in rounds, the order of the two phases flipping
every round:

  quiet     `--pins` Pin toggles of the loaded model, each timed, and
            `--loads` Unload + Load cycles, the Load timed to READY;
  scraping  the same while a child process holds `--connections` keep-alive
            connections to `/metrics`, each scraping again as soon as its
            answer is in (the worst a scraper flood can do).

Prints the medians per phase, their ratios (scraping / quiet), the scrapes
the endpoint answered per second, and the server's resident memory. With
`--baseline DIR` a server run from another checkout (say the commit before
the fix) is measured the same way in the same run, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
from streams import environment, start_server

from lemonade_grpc._gen.lemonade.v1 import model_control_pb2, model_control_pb2_grpc
from lemonade_grpc.provision.tiny_model import ensure_tiny_model

REQUEST = b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n"


# ------------------------------------------------------------ the scraper child


async def _scrape_forever(port: int, count: list[int], connected: asyncio.Event, total: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    count[1] += 1
    if count[1] == total:
        connected.set()
    try:
        while True:
            writer.write(REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            count[0] += 1
    finally:
        writer.close()


async def _scraper(port: int, connections: int) -> None:
    """Scrape on `connections` connections until standard input closes; print the scrapes answered."""
    count = [0, 0]
    connected = asyncio.Event()
    tasks = [
        asyncio.create_task(_scrape_forever(port, count, connected, connections)) for _ in range(connections)
    ]
    await connected.wait()
    print("ready", flush=True)
    started = count[0]
    await asyncio.to_thread(sys.stdin.read)
    print(count[0] - started, flush=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------ the bench


@dataclass
class Phase:
    pins: list[float] = field(default_factory=list)  # seconds
    loads: list[float] = field(default_factory=list)
    scrapes: int = 0
    seconds: float = 0.0


@dataclass
class Measured:
    quiet: Phase = field(default_factory=Phase)
    scraping: Phase = field(default_factory=Phase)
    rss: list[int] = field(default_factory=list)


async def _measure(
    control: model_control_pb2_grpc.ModelControlAsyncStub, phase: Phase, pins: int, loads: int
) -> None:
    for index in range(pins):
        started = time.perf_counter()
        await control.Pin(model_control_pb2.PinRequest(model="tiny", pinned=index % 2 == 0))
        phase.pins.append(time.perf_counter() - started)
    for _ in range(loads):
        await control.Unload(model_control_pb2.UnloadRequest(model="tiny"))
        started = time.perf_counter()
        async for _reply in control.Load(model_control_pb2.LoadRequest(model="tiny")):
            pass
        phase.loads.append(time.perf_counter() - started)


async def _round(
    address: str, port: int, pid: int, measured: Measured, args: argparse.Namespace, scraping_first: bool
) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        control: model_control_pb2_grpc.ModelControlAsyncStub = model_control_pb2_grpc.ModelControlStub(
            channel
        )
        async for _reply in control.Load(model_control_pb2.LoadRequest(model="tiny")):
            pass
        for scraping in (scraping_first, not scraping_first):
            if not scraping:
                await _measure(control, measured.quiet, args.pins, args.loads)
                continue
            child = subprocess.Popen(  # noqa: ASYNC220 - a child that lives through the phase
                [sys.executable, __file__, "--scraper", str(port), str(args.connections)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert child.stdin is not None
            assert child.stdout is not None
            try:
                assert (await asyncio.to_thread(child.stdout.readline)).strip() == "ready"
                started = time.perf_counter()
                await _measure(control, measured.scraping, args.pins, args.loads)
                measured.scraping.seconds += time.perf_counter() - started
                measured.rss.append(psutil.Process(pid).memory_info().rss)
                child.stdin.close()
                measured.scraping.scrapes += int(await asyncio.to_thread(child.stdout.readline))
            finally:
                child.kill()
                child.wait()


def _ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def report(results: dict[str, Measured], args: argparse.Namespace) -> None:
    print(
        f"{args.rounds} rounds, phases alternating; {args.pins} Pins and {args.loads} Unload+Load per phase;"
        f" {args.connections} scraping connections"
    )
    print()
    print(
        "| server | Pin p50 quiet | Pin p50 scraping | ratio | Load p50 quiet | Load p50 scraping | ratio |"
        " scrapes/s | RSS |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, m in results.items():
        pin_q, pin_s = _ms(m.quiet.pins), _ms(m.scraping.pins)
        load_q, load_s = _ms(m.quiet.loads), _ms(m.scraping.loads)
        rate = m.scraping.scrapes / m.scraping.seconds if m.scraping.seconds else 0.0
        rss = statistics.median(m.rss) / 2**20
        print(
            f"| {name} | {pin_q:.2f} ms | {pin_s:.2f} ms | {pin_s / pin_q:.1f}x | {load_q:.1f} ms |"
            f" {load_s:.1f} ms | {load_s / load_q:.1f}x | {rate:,.0f} | {rss:.1f} MiB |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--pins", type=int, default=25)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--baseline", type=Path, help="a checkout whose server is measured too")
    parser.add_argument(
        "--scraper", nargs=2, type=int, metavar=("PORT", "CONNECTIONS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.scraper:
        asyncio.run(_scraper(*args.scraper))
        return 0
    model = ensure_tiny_model()
    names = ["this"] + (["baseline"] if args.baseline else [])
    results = {name: Measured() for name in names}
    with tempfile.TemporaryDirectory(prefix="lemonade-bench-") as tmp:
        processes: dict[str, tuple[subprocess.Popen[bytes], str, int]] = {}
        try:
            for name in names:
                state = Path(tmp) / name
                state.mkdir()
                source = args.baseline.resolve() if name == "baseline" else None
                with environment({"LEMONADE_GRPC_PROMETHEUS_LISTEN": "127.0.0.1:0"}):
                    server = start_server(state, model, 512, ["--threads", "1"], source)
                port = int(re.findall(r"prometheus: http://127\.0\.0\.1:(\d+)/", server.log())[0])
                processes[name] = (server.process, server.address, port)
            for index in range(args.rounds):
                for name in names if index % 2 == 0 else reversed(names):
                    process, address, port = processes[name]
                    asyncio.run(_round(address, port, process.pid, results[name], args, index % 2 == 1))
        finally:
            for process, _, _ in processes.values():
                process.terminate()
                process.wait(30)
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
