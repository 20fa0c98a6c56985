"""lemonade-grpc side by side with llama-swap, llama-server's router and llama-server itself, in one run.

Four paths serve the same llama-server binary and the same model (the tiny
one, or SmolLM2 with `--model smollm2`) with the same arguments (`--threads 1`
by default):

  direct      a llama-server of its own, its SSE endpoint read by an aiohttp client;
  llama-swap  llama-swap (a Go proxy that starts llama-server on demand, one
              model at a time), read the same way through its port;
  router      llama-server's own router mode (`--models-dir DIR --models-max 1`:
              a child llama-server per model, loaded on demand), read the same way;
  lemonade    `Inference.Complete` on a lemonade-grpc server, read by a
              grpc.aio client.

Each round runs every row on every path, the order of the paths rotating
from round to round so that none always runs on a warmer machine:

  - a seeded 500-token stream (end of sequence ignored): tokens/s and time
    to first token (request sent to first text received); the text must be
    the same on every path, or the bench fails;
  - a 1-token request on the loaded model (streamed like the others): time
    to the end of the response;
  - a swap (llama-swap, the router and lemonade, each with two models of
    the tiny model's file and room for one): a 1-token request for the
    model not loaded, then one for the first again, each timed to its end.

Then lemonade's no-op `Load` (a Load of the loaded model, to the end of its
stream), each control plane's RSS (its own process, not the backends), and
each one's CPU time over an idle window with a model loaded.

Prints medians with the spread (25th-75th percentile). Usage:
`make bench-peers` (builds llama-swap from a source snapshot, see the
Makefile) or `python bench/peers.py --llama-swap PATH [--runs N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import psutil
from streams import SEED, Run, proxied, sse, start_server

from lemonade_grpc._gen.lemonade.v1 import inference_pb2_grpc, model_control_pb2, model_control_pb2_grpc
from lemonade_grpc.provision import smollm2
from lemonade_grpc.provision.llama_server import locate
from lemonade_grpc.provision.tiny_model import ensure_tiny_model
from lemonade_grpc.testing import cpu_model

PATHS = ("direct", "llama-swap", "router", "lemonade")
SWAPPERS = PATHS[1:]
MODELS = ("tiny", "tiny-b")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def backend_args(model: Path, ctx_size: int, extra: list[str]) -> list[str]:
    """llama-server's arguments after `--port N`: what lemonade-grpc's llamacpp recipe passes."""
    return [
        *("--model", str(model), "--host", "127.0.0.1", "--ctx-size", str(ctx_size), "--no-webui"),
        *extra,
    ]


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, seconds: float = 120) -> None:
    """Poll `url` until it answers 200; fail with the log when the process exits or time runs out."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise SystemExit(f"{url} never answered 200:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)


@contextmanager
def running(argv: list[str], log: Path, ready_url: str) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(ready_url, process, log)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def router_models(tmp: Path, model: Path) -> Path:
    """The router's models directory: the model's file under each catalog name (its names are the stems)."""
    directory = tmp / "router-models"
    directory.mkdir()
    for name in MODELS:
        (directory / f"{name}.gguf").symlink_to(model)
    return directory


def llama_swap_config(tmp: Path, args: list[str]) -> Path:
    """Two models of the same file, no groups: llama-swap runs one at a time and swaps on demand."""
    server = locate()
    lines = ["healthCheckTimeout: 60", "logLevel: warn", f"startPort: {free_port()}", "models:"]
    for name in MODELS:
        command = " ".join([str(server), "--port", "${PORT}", *args])
        lines += [f"  {name}:", f"    cmd: {command}", "    proxy: http://127.0.0.1:${PORT}"]
    config = tmp / "llama-swap.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


@dataclass
class Results:
    stream: dict[str, list[Run]] = field(default_factory=lambda: {path: [] for path in PATHS})
    one_token_ms: dict[str, list[float]] = field(default_factory=lambda: {path: [] for path in PATHS})
    swap_ms: dict[str, list[float]] = field(default_factory=lambda: {path: [] for path in SWAPPERS})
    noop_load_ms: list[float] = field(default_factory=list)
    rss_mib: dict[str, float] = field(default_factory=dict)
    # ms of CPU per minute idle, by path, then "main" (the event loop's thread) or "other" threads
    idle_cpu_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    go_table: str = ""


Request = Callable[[str, int], Awaitable[Run]]


async def bench(
    direct_port: int,
    swap_port: int,
    router_port: int,
    lemonade: str,
    pids: dict[str, int],
    runs: int,
    tokens: int,
    idle: float,
    go_client: Path | None = None,
) -> Results:
    results = Results()
    async with (
        grpc.aio.insecure_channel(lemonade) as channel,
        # A new connection per request: llama-server closes one after a streamed response.
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
    ):
        control = model_control_pb2_grpc.ModelControlStub(channel)
        stub = inference_pb2_grpc.InferenceStub(channel)

        def http(port: int) -> Request:
            url = f"http://127.0.0.1:{port}/v1/completions"
            return lambda model, count: sse(session, url, model, count)

        paths: dict[str, Request] = {
            "direct": http(direct_port),
            "llama-swap": http(swap_port),
            "router": http(router_port),
            "lemonade": lambda model, count: proxied(stub, model, count),
        }
        for _ in range(2):  # warm every path: connections, first-request costs, the first load
            for request in paths.values():
                await request("tiny", tokens)
        for index in range(runs):
            order = PATHS[index % len(PATHS) :] + PATHS[: index % len(PATHS)]
            for path in order:
                results.stream[path].append(await paths[path]("tiny", tokens))
            for path in order:
                run = await paths[path]("tiny", 1)
                results.one_token_ms[path].append(run.seconds * 1000)
        for index in range(runs):
            for path in SWAPPERS[index % len(SWAPPERS) :] + SWAPPERS[: index % len(SWAPPERS)]:
                for model in (MODELS[1], MODELS[0]):  # away and back: "tiny" is loaded after
                    run = await paths[path](model, 1)
                    results.swap_ms[path].append(run.seconds * 1000)
        for _ in range(runs * 10):
            started = time.perf_counter()
            async for _progress in control.Load(model_control_pb2.LoadRequest(model="tiny")):
                pass
            results.noop_load_ms.append((time.perf_counter() - started) * 1000)
    if go_client is not None:
        # With Go clients: what the control planes cost when the client is not Python.
        results.go_table = await asyncio.to_thread(
            run_go_client,
            go_client,
            lemonade,
            {"direct": direct_port, "llama-swap": swap_port},
            runs,
        )
    # Measured with the clients gone and "tiny" loaded on both control planes.
    processes = {name: psutil.Process(pid) for name, pid in pids.items()}
    for name, process in processes.items():
        results.rss_mib[name] = process.memory_info().rss / 2**20
    before = {name: cpu_by_thread(pid) for name, pid in pids.items()}
    await asyncio.sleep(idle)
    for name, pid in pids.items():
        after = cpu_by_thread(pid)
        for thread, nanoseconds in after.items():
            used = (nanoseconds - before[name].get(thread, 0)) / 1e6  # ms
            results.idle_cpu_ms.setdefault(name, {}).setdefault(thread[1], 0.0)
            results.idle_cpu_ms[name][thread[1]] += used * 60 / idle  # per minute
    return results


GO_CLIENT_DIR = Path(__file__).resolve().parent.parent / "clients" / "go"


def build_go_client(tmp: Path) -> Path | None:
    """clients/go's lemonade-firsttoken, built into `tmp`; None (said) when Go cannot build it."""
    target = tmp / "lemonade-firsttoken"
    try:
        subprocess.run(
            ["go", "build", "-o", str(target), "./cmd/lemonade-firsttoken"],
            cwd=GO_CLIENT_DIR,
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"(no Go client rows: cannot build lemonade-firsttoken: {error})", file=sys.stderr)
        return None
    return target


def run_go_client(binary: Path, lemonade: str, ports: dict[str, int], runs: int) -> str:
    """The Go client's table: time to first token and 1-token request on every path, rotating."""
    http = [f"{name}=http://127.0.0.1:{port}/v1/completions" for name, port in ports.items()]
    argv = [str(binary), "-grpc", lemonade, "-model", "tiny", "-rounds", str(runs)]
    for endpoint in http:
        argv += ["-http", endpoint]
    argv += ["-close", "direct"]  # llama-server closes a connection after a stream; llama-swap keeps it
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"lemonade-firsttoken failed: {done.stderr.strip()}")
    return done.stdout


def cpu_by_thread(pid: int) -> dict[tuple[int, str], int]:
    """Each thread's CPU time so far in ns, from /proc/PID/task/*/schedstat (exact, unlike tick counts).

    Keyed by (tid, kind): kind is "main" for the thread that runs the event
    loop (or Go's first), "other" for the rest (gRPC core's, Go's runtime).
    """
    times: dict[tuple[int, str], int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            nanoseconds = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        times[int(task.name), "main" if int(task.name) == pid else "other"] = nanoseconds
    return times


def spread(values: list[float], unit: str, digits: int = 2) -> str:
    """Median with the 25th-75th percentile range."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return f"{median:,.{digits}f} {unit} ({q1:,.{digits}f}-{q3:,.{digits}f})"


def cells(columns: tuple[list[float], ...], unit: str, digits: int = 2) -> str:
    """A table row's cells: each column's `spread`."""
    return " | ".join(spread(values, unit, digits) for values in columns)


def report(results: Results, runs: int, tokens: int, extra: str, binary: Path, model: Path) -> int:
    everything = [run for path in PATHS for run in results.stream[path]]
    if len({run.text for run in everything}) != 1:
        print("FAIL: the paths returned different texts", file=sys.stderr)
        return 1
    if any(run.tokens != tokens for run in everything):
        print(f"FAIL: a stream did not return {tokens} tokens", file=sys.stderr)
        return 1
    tps = {path: [run.tokens_per_second for run in results.stream[path]] for path in PATHS}
    ttft = {path: [run.first_token_ms for run in results.stream[path]] for path in PATHS}
    med = statistics.median
    print(
        f"machine: {os.cpu_count()} CPUs, {cpu_model()}, {psutil.virtual_memory().total / 2**30:.0f} GiB;"
        f" Python {platform.python_version()}, grpcio {grpc.__version__}; llama-swap {binary}"
    )
    print(
        f"model {model.name}; {runs} rounds, path order rotating; {tokens}-token streams, seed {SEED},"
        " temperature 0,"
        f" EOS ignored; llama-server args: {extra or '(none)'}; medians (25th-75th percentile)"
    )
    print()
    print(
        "| row | llama-server direct | llama-swap | llama-server router | lemonade-grpc | vs the best peer |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    d, s, r, g = (tps[path] for path in PATHS)
    print(f"| streaming tokens/s | {cells((d, s, r, g), '', 0)} | {med(g) / max(med(s), med(r)):.3f}x |")
    d, s, r, g = (ttft[path] for path in PATHS)
    print(f"| time to first token | {cells((d, s, r, g), 'ms')} | {med(g) - min(med(s), med(r)):+.2f} ms |")
    d, s, r, g = (results.one_token_ms[path] for path in PATHS)
    print(f"| 1-token request | {cells((d, s, r, g), 'ms')} | {med(g) - min(med(s), med(r)):+.2f} ms |")
    s, r, g = (results.swap_ms[path] for path in SWAPPERS)
    faster = min(med(s), med(r)) / med(g)
    print(f"| swap (1 slot, 1-token request) | - | {cells((s, r, g), 'ms', 1)} | {faster:.1f}x faster |")
    noop = results.noop_load_ms
    p99 = statistics.quantiles(noop, n=100)[98]
    print(f"| no-op Load | - | - | - | {spread(noop, 'ms')}, p99 {p99:.2f} ms | (target <= 2 ms) |")
    rss = results.rss_mib
    print(
        f"| control plane RSS after the runs | - | {rss['llama-swap']:.1f} MiB | {rss['router']:.1f} MiB"
        f" | {rss['lemonade']:.1f} MiB | (target <= 50 MiB) |"
    )
    cpu = {name: sum(threads.values()) for name, threads in results.idle_cpu_ms.items()}
    print(
        f"| idle CPU, model loaded (ms per minute) | - | {cpu['llama-swap']:.1f} | {cpu['router']:.1f}"
        f" | {cpu['lemonade']:.1f} | {cpu['lemonade'] - min(cpu['llama-swap'], cpu['router']):+.1f} ms/min |"
    )
    print()
    for name, threads in results.idle_cpu_ms.items():
        print(
            f"idle CPU of {name}: {cpu[name]:.1f} ms per minute ({cpu[name] / 600:.3f} % of a CPU);"
            f" first thread (the event loop) {threads.get('main', 0.0):.1f},"
            f" other threads {threads.get('other', 0.0):.1f}"
        )
    if results.go_table:
        print()
        print(results.go_table.rstrip())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-swap", type=Path, required=True, help="the llama-swap binary")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--no-go-client", action="store_true", help="skip the rows measured with Go clients")
    parser.add_argument(
        "--backend-args", default="--threads 1", help="extra llama-server arguments, every path"
    )
    parser.add_argument(
        "--model",
        choices=("tiny", "smollm2"),
        default="tiny",
        help="the generated tiny model, or the real default model (SmolLM2-135M-Instruct)",
    )
    args = parser.parse_args()
    model = smollm2.ensure() if args.model == "smollm2" else ensure_tiny_model()
    extra = args.backend_args.split()
    ctx_size = args.tokens + 64
    with tempfile.TemporaryDirectory(prefix="lemonade-peers-") as name, ExitStack() as stack:
        tmp = Path(name)
        direct_port, swap_port, router_port = free_port(), free_port(), free_port()
        common = backend_args(model, ctx_size, extra)
        stack.enter_context(
            running(
                [str(locate()), "--port", str(direct_port), *common],
                tmp / "direct.log",
                f"http://127.0.0.1:{direct_port}/health",
            )
        )
        swap = stack.enter_context(
            running(
                [
                    str(args.llama_swap),
                    *("--config", str(llama_swap_config(tmp, common))),
                    *("--listen", f"127.0.0.1:{swap_port}"),
                ],
                tmp / "llama-swap.log",
                f"http://127.0.0.1:{swap_port}/health",
            )
        )
        router = stack.enter_context(
            running(
                [
                    str(locate()),
                    *("--models-dir", str(router_models(tmp, model)), "--models-max", "1"),
                    *("--port", str(router_port), "--host", "127.0.0.1"),
                    *("--ctx-size", str(ctx_size), "--no-webui", *extra),
                ],
                tmp / "router.log",
                f"http://127.0.0.1:{router_port}/health",
            )
        )
        state = tmp / "lemonade"
        state.mkdir()
        server = start_server(state, model, ctx_size, extra, names=MODELS)
        stack.callback(server.stop)
        address = server.address
        pids = {"llama-swap": swap.pid, "router": router.pid, "lemonade": server.process.pid}
        try:
            go_client = None if args.no_go_client else build_go_client(tmp)
            results = asyncio.run(
                bench(
                    direct_port,
                    swap_port,
                    router_port,
                    address,
                    pids,
                    args.runs,
                    args.tokens,
                    args.idle_seconds,
                    go_client,
                )
            )
        except RuntimeError as error:
            print(f"FAIL: {error}", file=sys.stderr)
            for log in ("llama-swap.log", "router.log", "lemonade/server.log"):
                print(f"--- {log}\n{(tmp / log).read_text(errors='replace')[-4000:]}", file=sys.stderr)
            return 1
    return report(results, args.runs, args.tokens, args.backend_args, args.llama_swap, model)


if __name__ == "__main__":
    sys.exit(main())
