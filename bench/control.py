"""The control plane's own costs: no-op Load, Status, Watch fan-out, coalesced loads.

Against real servers (the bundled tiny model served by a real llama-server,
`--threads 1`), from Python grpc.aio clients:

  latency   a no-op Load (the model is loaded already; timed to the end of
            its stream) and a Status, interleaved, `--calls` each on one
            channel: median and p99.
  fan-out   `--subscribers` Watch streams held open by one client process
            (a child of this one, over several channels). Pin toggles of the
            loaded model, one event each, waited for at every subscriber
            before the next: delivery latency per (event, subscriber), the
            time the subscriber received it minus the event's own `time`
            (same host, same clock), median and p99. And a Load of a second
            model (real llama-server; a Pin toggle sent at the same moment)
            timed to READY with the subscribers watching against with none:
            the effect of the fan-out on a concurrent Load.
  coalesce  `--concurrent` identical Loads of an unloaded model at once: the
            number of backends started (Status `backends_started`, the pids
            in the READY messages, llama-server processes under the server)
            must be one; the time until all are READY against a single Load
            of the same model.

With `--baseline DIR` every measurement is also taken, alternating, on a
server run from another checkout (say the commit before a change).
Prints medians, ratios and the machine, and saves the output under
`bench/results/control-<date>.txt`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from streams import serve

from lemonade_grpc._gen.lemonade.v1 import model_control_pb2 as pb
from lemonade_grpc._gen.lemonade.v1 import model_control_pb2_grpc as pb_grpc
from lemonade_grpc.provision.tiny_model import ensure_tiny_model
from lemonade_grpc.testing import ServerProcess, cpu_model

HERE = Path(__file__).resolve().parent
# Channels the subscribers are spread over: one HTTP/2 connection each.
SUBSCRIBER_CHANNELS = 10
# Distinct connections per channel, not one subchannel shared by all.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


def percentile(values: list[float], fraction: float) -> float:
    """The `fraction` quantile of `values` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def start_server(
    state_dir: Path, model: Path, source: Path | None, gc_threshold: str | None = None
) -> ServerProcess:
    """A server with the tiny model twice (`tiny`, `tiny-b`), two LLM slots; `source`: another checkout's.

    `gc_threshold` ("700,10,10"): the server's `gc.set_threshold`, set before it starts.
    """
    config = state_dir / "bench.toml"
    args = json.dumps(["--threads", "1"])
    config.write_text(
        "[pool]\nmax_loaded = { llm = 2 }\n"
        "[limits]\nmax_watch_streams = 4096\n"
        f'[models.tiny]\nrecipe = "llamacpp"\npath = "{model}"\nctx_size = 512\nargs = {args}\n'
        f'[models.tiny-b]\nrecipe = "llamacpp"\npath = "{model}"\nctx_size = 512\nargs = {args}\n'
    )
    python = [sys.executable, "-m", "lemonade_grpc"]
    if gc_threshold is not None:
        python = [
            *(sys.executable, "-c"),
            f"import gc, runpy; gc.set_threshold({gc_threshold});"
            " runpy.run_module('lemonade_grpc', run_name='__main__', alter_sys=True)",
        ]
    return serve(state_dir, config, python=tuple(python), cwd=source)


# ------------------------------------------------------------ the subscribers


async def subscribers_main(address: str, count: int) -> None:
    """The subscriber process: `count` Watch streams; commands on stdin, answers on stdout (JSON lines).

    `wait SEQ SECONDS`: answer once every subscriber has received event SEQ
    (or the time is up) with how many have. `take`: every delivery latency
    recorded since the last `take`, by sequence, and each event's time and
    last delivery (epoch seconds). `quit`.
    """
    channels = [
        grpc.aio.insecure_channel(address, options=[*CHANNEL_OPTIONS, ("lemonade.bench.channel", i)])
        for i in range(SUBSCRIBER_CHANNELS)
    ]
    latencies: dict[int, list[float]] = {}
    times: dict[int, list[float]] = {}  # sequence -> [the event's time, its last delivery]
    last = [0] * count
    resyncs = 0
    started = asyncio.Event()
    snapshots = 0
    progress = asyncio.Event()

    async def subscribe(index: int) -> None:
        nonlocal snapshots, resyncs
        stub = pb_grpc.ModelControlStub(channels[index % len(channels)])
        async for message in stub.Watch(pb.WatchRequest()):
            received = time.time()
            if message.HasField("snapshot"):
                if message.resync:
                    resyncs += 1
                else:
                    snapshots += 1
                    if snapshots == count:
                        started.set()
            else:
                sent = message.time.seconds + message.time.nanos / 1e9
                latencies.setdefault(message.sequence, []).append((received - sent) * 1000)
                times.setdefault(message.sequence, [sent, received])[1] = received
            last[index] = message.sequence
            progress.set()

    async def stop() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks = [asyncio.create_task(subscribe(i)) for i in range(count)]
    ready = asyncio.ensure_future(started.wait())
    command = asyncio.ensure_future(reader.readline())
    # Until every stream has its snapshot: the bench going away (stdin's end)
    # or a stream failing ends this process, never a wait forever.
    await asyncio.wait({ready, command, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
        await stop()
        raise SystemExit("the subscribers did not all start")

    def answer(value: object) -> None:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()

    answer({"ready": count})
    while line := (await command).decode().split():
        command = asyncio.ensure_future(reader.readline())
        if line[0] == "wait":
            sequence, deadline = int(line[1]), time.monotonic() + float(line[2])
            while min(last) < sequence and time.monotonic() < deadline:
                progress.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(progress.wait(), max(0.0, deadline - time.monotonic()))
            answer({"reached": sum(s >= sequence for s in last), "resyncs": resyncs})
        elif line[0] == "take":
            answer({"latencies": latencies, "times": times})
            latencies.clear()
            times.clear()
        else:
            break
    command.cancel()
    await stop()


class Subscribers:
    """The subscriber process, seen from the bench."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @classmethod
    async def open(cls, address: str, count: int) -> Subscribers:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, str(Path(__file__)), "--subscriber-process", address, str(count)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 30,  # `take` answers every latency on one line
        )
        subscribers = cls(process)
        ready = await asyncio.wait_for(subscribers._answer(), 120)
        assert ready == {"ready": count}, ready
        return subscribers

    async def _answer(self) -> Any:
        assert self._process.stdout is not None
        line = await self._process.stdout.readline()
        if not line:
            raise SystemExit("the subscriber process ended")
        return json.loads(line)

    async def _ask(self, command: str) -> Any:
        assert self._process.stdin is not None
        self._process.stdin.write(command.encode() + b"\n")
        await self._process.stdin.drain()
        return await self._answer()

    async def wait(self, sequence: int, seconds: float = 30.0) -> dict[str, int]:
        answer: dict[str, int] = await self._ask(f"wait {sequence} {seconds}")
        return answer

    async def take(self) -> tuple[dict[int, list[float]], dict[int, list[float]]]:
        """Delivery latencies (ms) by sequence, and each event's [time, last delivery] (epoch seconds)."""
        taken = await self._ask("take")
        return (
            {int(k): v for k, v in taken["latencies"].items()},
            {int(k): v for k, v in taken["times"].items()},
        )

    async def close(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(b"quit\n")
        await self._process.stdin.drain()
        self._process.stdin.close()
        await self._process.wait()


# ------------------------------------------------------------------ the bench


@dataclass
class Server:
    name: str
    address: str
    process: subprocess.Popen[bytes]
    channel: grpc.aio.Channel | None = None
    load_ms: list[float] = field(default_factory=list)
    status_ms: list[float] = field(default_factory=list)
    pin_delivery_ms: list[float] = field(default_factory=list)
    load_delivery_ms: list[float] = field(default_factory=list)
    # Per watched Load: its first event's time to the last delivery of its last event.
    burst_drain_ms: list[float] = field(default_factory=list)
    undelivered: int = 0
    resyncs: int = 0
    concurrent_load_ms: dict[str, list[float]] = field(default_factory=lambda: {"none": [], "watched": []})
    single_ms: list[float] = field(default_factory=list)
    group_ms: list[float] = field(default_factory=list)
    group_each_ms: list[float] = field(default_factory=list)
    spawns: list[int] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)

    @property
    def stub(self) -> pb_grpc.ModelControlAsyncStub:
        assert self.channel is not None
        return pb_grpc.ModelControlStub(self.channel)


async def load(stub: pb_grpc.ModelControlAsyncStub, model: str) -> tuple[float, pb.LoadResponse]:
    """Milliseconds until the end of a Load's stream, and its last message."""
    last = pb.LoadResponse()
    started = time.perf_counter()
    async for message in stub.Load(pb.LoadRequest(model=model)):
        last = message
    elapsed = (time.perf_counter() - started) * 1000
    if last.phase != pb.LOAD_PHASE_READY:
        raise SystemExit(f"Load {model} ended in phase {last.phase}")
    return elapsed, last


async def status(stub: pb_grpc.ModelControlAsyncStub) -> tuple[float, pb.PoolStatus]:
    started = time.perf_counter()
    reply = await stub.Status(pb.StatusRequest())
    return (time.perf_counter() - started) * 1000, reply.pool


def alternating(servers: list[Server], index: int) -> Iterator[Server]:
    return iter(servers if index % 2 == 0 else reversed(servers))


async def latency(servers: list[Server], calls: int, rounds: int) -> None:
    for server in servers:  # warm-up
        for _ in range(20):
            await load(server.stub, "tiny")
            await status(server.stub)
    per_round = max(1, calls // rounds)
    for index in range(rounds):
        for server in alternating(servers, index):
            for _ in range(per_round):
                elapsed, last = await load(server.stub, "tiny")
                if not last.already_loaded:
                    raise SystemExit("a no-op Load was not already_loaded")
                server.load_ms.append(elapsed)
                server.status_ms.append((await status(server.stub))[0])


async def cycle(server: Server, pin: bool) -> float:
    """Load `tiny-b` (with a Pin toggle of `tiny` at the same moment), then unload it: the Load's ms."""
    stub = server.stub
    (elapsed, _), _ = await asyncio.gather(
        load(stub, "tiny-b"), stub.Pin(pb.PinRequest(model="tiny", pinned=pin))
    )
    await stub.Unload(pb.UnloadRequest(model="tiny-b"))
    return elapsed


async def fan_out(server: Server, subscribers: int, events: int, loads: int) -> None:
    """One round on `server`: loads with no subscriber, then pin events and loads with `subscribers`."""
    stub = server.stub
    for i in range(loads):
        server.concurrent_load_ms["none"].append(await cycle(server, i % 2 == 0))
    await stub.Pin(pb.PinRequest(model="tiny", pinned=False))
    watchers = await Subscribers.open(server.address, subscribers)
    try:
        pin_sequences: set[int] = set()
        for i in range(events):
            before = (await status(stub))[1].sequence
            await stub.Pin(pb.PinRequest(model="tiny", pinned=i % 2 == 0))
            sequence = (await status(stub))[1].sequence
            if sequence != before + 1:
                raise SystemExit(f"a Pin published {sequence - before} events, not one")
            pin_sequences.add(sequence)
            reached = await watchers.wait(sequence)
            server.undelivered += subscribers - reached["reached"]
            await asyncio.sleep(0.05)
        bursts = []
        for i in range(loads):
            first = (await status(stub))[1].sequence + 1
            server.concurrent_load_ms["watched"].append(await cycle(server, i % 2 == 0))
            last = (await status(stub))[1].sequence
            bursts.append(range(first, last + 1))
            reached = await watchers.wait(last)
            server.undelivered += subscribers - reached["reached"]
            server.resyncs = reached["resyncs"]
        latencies, times = await watchers.take()
        for sequence, values in latencies.items():
            (server.pin_delivery_ms if sequence in pin_sequences else server.load_delivery_ms).extend(values)
        for burst in bursts:
            sent = min(times[sequence][0] for sequence in burst)
            server.burst_drain_ms.append((max(times[sequence][1] for sequence in burst) - sent) * 1000)
    finally:
        await watchers.close()
    # Leave `tiny` unpinned, as found.
    await stub.Pin(pb.PinRequest(model="tiny", pinned=False))


def llama_servers(server: Server) -> int:
    """llama-server processes under `server` now."""
    children = psutil.Process(server.process.pid).children(recursive=True)
    count = 0
    for child in children:
        with contextlib.suppress(psutil.Error):
            count += "llama-server" in child.name()
    return count


async def coalesce(server: Server, concurrent: int) -> None:
    """One round: a single Load of `tiny-b`, then `concurrent` identical ones at once."""
    stub = server.stub
    server.single_ms.append((await load(stub, "tiny-b"))[0])
    await stub.Unload(pb.UnloadRequest(model="tiny-b"))
    before = (await status(stub))[1].backends_started
    started = time.perf_counter()
    results = await asyncio.gather(*(load(stub, "tiny-b") for _ in range(concurrent)))
    server.group_ms.append((time.perf_counter() - started) * 1000)
    server.group_each_ms.extend(elapsed for elapsed, _ in results)
    after = (await status(stub))[1]
    server.spawns.append(after.backends_started - before)
    server.pids.append(len({last.status.pid for _, last in results}))
    server.processes.append(llama_servers(server))
    await stub.Unload(pb.UnloadRequest(model="tiny-b"))


async def bench(servers: list[Server], args: argparse.Namespace) -> None:
    for server in servers:
        server.channel = grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS)
        await load(server.stub, "tiny")
    try:
        if "latency" in args.sections:
            print("latency ...", file=sys.stderr)
            await latency(servers, args.calls, rounds=10)
        for index in range(args.fanout_rounds if "fanout" in args.sections else 0):
            for server in alternating(servers, index):
                print(f"fan-out round {index + 1} on {server.name} ...", file=sys.stderr)
                await fan_out(server, args.subscribers, args.events, args.loads)
        for index in range(args.coalesce_rounds if "coalesce" in args.sections else 0):
            for server in alternating(servers, index):
                print(f"coalesce round {index + 1} on {server.name} ...", file=sys.stderr)
                await coalesce(server, args.concurrent)
    finally:
        for server in servers:
            if server.channel is not None:
                await server.channel.close()


def stats(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} | {percentile(values, 0.99):.2f}"


def report(servers: list[Server], args: argparse.Namespace) -> int:
    print(
        f"machine: {os.cpu_count()} CPUs, {cpu_model()}, {psutil.virtual_memory().total / 2**30:.0f} GiB;"
        f" Python {platform.python_version()}, grpcio {grpc.__version__}; {datetime.date.today()}"
    )
    print(
        "servers: the tiny model (`tiny`, and `tiny-b`: the same file) on llama-server --threads 1,"
        f" two LLM slots: {', '.join(s.name for s in servers)}"
    )
    failed = False
    if "latency" in args.sections:
        latency_table(servers, args)
    if "fanout" in args.sections:
        failed |= fan_out_table(servers, args)
    if "coalesce" in args.sections:
        failed |= coalesce_table(servers, args)
    print()
    print(
        "targets (issue 13): no-op Load median <= 2 ms; fan-out p99 <= 100 ms, a concurrent Load unaffected"
    )
    return 1 if failed else 0


def latency_table(servers: list[Server], args: argparse.Namespace) -> None:
    print()
    print(f"## Latency: {args.calls} calls each, interleaved, one channel (ms)")
    print()
    print("| server | no-op Load median | p99 | Status median | p99 |")
    print("|---|---:|---:|---:|---:|")
    for s in servers:
        print(f"| {s.name} | {stats(s.load_ms)} | {stats(s.status_ms)} |")


def fan_out_table(servers: list[Server], args: argparse.Namespace) -> bool:
    print()
    print(
        f"## Watch fan-out: {args.subscribers} subscribers in one process ({SUBSCRIBER_CHANNELS} channels),"
        f" {args.fanout_rounds} rounds"
    )
    print()
    print(
        "delivery latency (ms, received minus the event's time, every event at every subscriber);"
        " Load of tiny-b to READY (ms) with a Pin toggle at the same moment"
    )
    print()
    print(
        "| server | Pin event delivery median | p99 | Load's events delivery median | p99"
        " | Load, no subscriber | Load, subscribers watching | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in servers:
        none = statistics.median(s.concurrent_load_ms["none"])
        watched = statistics.median(s.concurrent_load_ms["watched"])
        print(
            f"| {s.name} | {stats(s.pin_delivery_ms)} | {stats(s.load_delivery_ms)}"
            f" | {none:.1f} | {watched:.1f} | {watched / none:.2f} |"
        )
    failed = False
    for s in servers:
        print(
            f"{s.name}: {len(s.pin_delivery_ms)} Pin deliveries, {len(s.load_delivery_ms)} Load-event"
            f" deliveries, {s.undelivered} not delivered within 30 s, {s.resyncs} resyncs;"
            f" a watched Load's events, first published to last delivered (median):"
            f" {statistics.median(s.burst_drain_ms):.0f} ms"
        )
        failed |= s.undelivered > 0
    return failed


def coalesce_table(servers: list[Server], args: argparse.Namespace) -> bool:
    print()
    print(
        f"## {args.concurrent} concurrent identical Loads of an unloaded model, {args.coalesce_rounds} rounds"
    )
    print()
    print(
        "| server | single Load (ms) | all READY (ms) | ratio | each Load median (ms)"
        " | backends started | distinct pids | llama-servers |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    failed = False
    for s in servers:
        single = statistics.median(s.single_ms)
        group = statistics.median(s.group_ms)
        print(
            f"| {s.name} | {single:.1f} | {group:.1f} | {group / single:.2f}"
            f" | {statistics.median(s.group_each_ms):.1f} | {sorted(set(s.spawns))} | {sorted(set(s.pids))}"
            f" | {sorted(set(s.processes))} |"
        )
        if set(s.spawns) != {1} or set(s.pids) != {1} or set(s.processes) != {2}:
            print(f"FAIL: {s.name}: concurrent identical Loads started more than one backend")
            failed = True
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="no-op Loads and Statuses per server")
    parser.add_argument("--subscribers", type=lambda text: max(1, int(text)), default=1000)
    parser.add_argument("--events", type=int, default=50, help="Pin events per fan-out round")
    parser.add_argument("--loads", type=int, default=10, help="Loads per fan-out round, with and without")
    parser.add_argument("--fanout-rounds", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=100)
    parser.add_argument("--coalesce-rounds", type=int, default=3)
    parser.add_argument(
        "--source", type=Path, help="run the main server from this checkout (default: the bench's own)"
    )
    parser.add_argument("--baseline", type=Path, help="a checkout whose server is measured too, alternating")
    parser.add_argument("--label", default="this checkout", help="the main server's name in the tables")
    parser.add_argument("--baseline-label", default="baseline", help="the baseline's name in the tables")
    parser.add_argument(
        "--gc-threshold",
        help="run the main server with gc.set_threshold(THIS), e.g. 10000,10,10 (an experiment; see"
        " docs/performance.md)",
    )
    parser.add_argument(
        "--sections",
        type=lambda text: set(text.split(",")),
        default={"latency", "fanout", "coalesce"},
        help="comma-separated: latency, fanout, coalesce (default: all)",
    )
    parser.add_argument("--out", type=Path, help="default: bench/results/control-<date>.txt")
    parser.add_argument("--subscriber-process", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subscriber_process:
        address, count = args.subscriber_process
        asyncio.run(subscribers_main(address, int(count)))
        return 0
    model = ensure_tiny_model()
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="lemonade-bench-control-") as tmp:
        try:
            for name, source, gc_threshold in (
                (args.label, args.source, args.gc_threshold),
                (args.baseline_label, args.baseline, None),
            ):
                if name == args.baseline_label and source is None:
                    continue
                state = Path(tmp) / str(len(servers))
                state.mkdir()
                started = start_server(state, model, source.resolve() if source else None, gc_threshold)
                servers.append(Server(name, started.address, started.process))
            asyncio.run(bench(servers, args))
        finally:
            for server in servers:
                server.process.terminate()
                server.process.wait(30)
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            status = report(servers, args)
            if args.gc_threshold:
                print(f"{args.label}: gc.set_threshold({args.gc_threshold}) in the server")
            for label, path in (
                (args.label, args.source or HERE.parent),
                (args.baseline_label, args.baseline),
            ):
                if path is not None:
                    print(f"{label}: {path} ({git_head(path)})")
        text = output.getvalue()
        print(text, end="")
        out = args.out or HERE / "results" / f"control-{datetime.date.today()}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"saved to {out}", file=sys.stderr)
        return status


def git_head(path: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"


if __name__ == "__main__":
    sys.exit(main())
