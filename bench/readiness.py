"""What the control plane adds to a backend's own start: spawn to READY, minus llama-server's "model loaded".

Each round loads the bundled tiny model through `ModelControl.Load`, then
unloads it. The client notes when the LOADING message (sent as the backend
is spawned) and the READY message arrive; llama-server's log says when,
after its own start, the model was loaded. The overhead is

    (READY arrived - LOADING arrived) - llama-server's "model loaded" time

an upper bound of what the control plane adds: it also holds the exec of
llama-server and its dynamic linking, before llama-server's clock starts,
which no control plane can save. With `--baseline DIR`, a server run from
another checkout (say the commit before readiness followed the backend's
output) takes its turns in the same run, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from streams import start_server

from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2_grpc
from lemonade_grpc.provision.tiny_model import ensure_tiny_model

# llama-server's log clock: minutes.seconds.milliseconds.microseconds since its start.
MODEL_LOADED = re.compile(rb"^(\d+)\.(\d+)\.(\d+)\.(\d+) I srv +llama_server: model loaded", re.MULTILINE)


def loaded_at(log: Path, offset: int) -> float:
    """Seconds after its start at which llama-server logged "model loaded", in this run's part of `log`."""
    with log.open("rb") as file:
        file.seek(offset)
        matches = MODEL_LOADED.findall(file.read())
    if not matches:
        raise SystemExit(f"no 'model loaded' line in {log} after byte {offset}")
    minutes, seconds, millis, micros = (int(part) for part in matches[-1])
    return minutes * 60 + seconds + millis / 1e3 + micros / 1e6


def size_of(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


async def one_load(stub: model_control_pb2_grpc.ModelControlAsyncStub, log: Path) -> float:
    """Load, unload; return the overhead in milliseconds."""
    offset = size_of(log)
    spawned = ready = 0.0
    async for response in stub.Load(pb.LoadRequest(model="tiny")):
        if response.phase == pb.LOAD_PHASE_LOADING and not spawned:
            spawned = time.perf_counter()
        if response.phase == pb.LOAD_PHASE_READY:
            ready = time.perf_counter()
    await stub.Unload(pb.UnloadRequest(model="tiny"))
    return ((ready - spawned) - loaded_at(log, offset)) * 1000


async def bench(servers: dict[str, tuple[str, Path]], rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {name: [] for name in servers}
    channels = {name: grpc.aio.insecure_channel(address) for name, (address, _) in servers.items()}
    try:
        stubs = {name: model_control_pb2_grpc.ModelControlStub(channel) for name, channel in channels.items()}
        for name in stubs:  # warm-up: the binary and the model in the page cache
            await one_load(stubs[name], servers[name][1])
        order = list(stubs)
        for index in range(rounds):
            for name in order if index % 2 == 0 else reversed(order):
                results[name].append(await one_load(stubs[name], servers[name][1]))
    finally:
        for channel in channels.values():
            await channel.close()
    return results


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--baseline", type=Path, help="a checkout whose server takes turns too")
    args = parser.parse_args()
    model = ensure_tiny_model()
    with tempfile.TemporaryDirectory(prefix="lemonade-bench-") as tmp:
        processes = []
        servers: dict[str, tuple[str, Path]] = {}
        try:
            sources = {"this checkout": None, "baseline": args.baseline}
            for name, source in sources.items():
                if name == "baseline" and source is None:
                    continue
                state = Path(tmp) / name.replace(" ", "-")
                state.mkdir()
                server = start_server(
                    state, model, 512, ["--threads", "1"], source.resolve() if source else None
                )
                processes.append(server.process)
                servers[name] = (server.address, state / "logs" / "tiny.log")
            results = asyncio.run(bench(servers, args.rounds))
        finally:
            for process in processes:
                process.terminate()
                process.wait(30)
    print(f"{args.rounds} loads each, alternating; the bundled tiny model, llama-server --threads 1")
    print()
    print("| server | overhead median | p90 | min | max |")
    print("|---|---:|---:|---:|---:|")
    for name, overheads in results.items():
        print(
            f"| {name} | {statistics.median(overheads):.2f} ms | {percentile(overheads, 0.9):.2f} ms"
            f" | {min(overheads):.2f} ms | {max(overheads):.2f} ms |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
