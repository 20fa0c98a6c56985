"""What telemetry costs a stream: the same completion through servers with telemetry off and on.

In one run, alternating (the order flips every round), the same seeded
500-token completion of the bundled tiny model is streamed through
`Inference.Complete` from:

  off       a server with telemetry off (the default);
  on        a server exporting traces and metrics by OTLP/gRPC to a local
            collector stand-in (every export accepted, short batch and
            export intervals: the worst case) and serving a Prometheus
            endpoint that this bench scrapes once per round;
  baseline  (with `--baseline DIR`) a server run from another checkout,
            say the commit before telemetry, to show "off" costs nothing.

Each server runs its own llama-server (same binary, model and arguments).
Prints medians over `--runs` rounds and the paired differences per token.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import psutil
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from streams import Run, environment, proxied, start_server

from lemonade_grpc._gen.lemonade.v1 import inference_pb2_grpc, model_control_pb2, model_control_pb2_grpc
from lemonade_grpc.provision.tiny_model import ensure_tiny_model


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    async def Export(self, request: object, context: object) -> trace_service_pb2.ExportTraceServiceResponse:
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    async def Export(
        self, request: object, context: object
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        return metrics_service_pb2.ExportMetricsServiceResponse()


async def collector() -> tuple[grpc.aio.Server, int]:
    """A stand-in OTLP/gRPC collector that accepts every export."""
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(), server)  # type: ignore[no-untyped-call]
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def loaded(channel: grpc.aio.Channel) -> inference_pb2_grpc.InferenceAsyncStub:
    """An Inference stub on `channel`, the tiny model loaded."""
    control = model_control_pb2_grpc.ModelControlStub(channel)
    async for _ in control.Load(model_control_pb2.LoadRequest(model="tiny")):
        pass
    return inference_pb2_grpc.InferenceStub(channel)


def median_tps(runs: list[Run]) -> float:
    return statistics.median(r.tokens_per_second for r in runs)


@dataclass
class Measured:
    """One completion through one server: the client's view, and the server process's CPU time."""

    run: Run
    cpu_seconds: float


def cpu_seconds(process: psutil.Process) -> float:
    """User and system CPU time of the control plane process (not its backend)."""
    times = process.cpu_times()
    return float(times.user + times.system)


async def bench(
    servers: dict[str, tuple[str, int]], runs: int, tokens: int, prometheus: int
) -> dict[str, list[Measured]]:
    results: dict[str, list[Measured]] = {name: [] for name in servers}
    processes = {name: psutil.Process(pid) for name, (_, pid) in servers.items()}
    channels = {name: grpc.aio.insecure_channel(address) for name, (address, _) in servers.items()}
    try:
        stubs = {name: await loaded(channel) for name, channel in channels.items()}
        async with aiohttp.ClientSession() as session:
            for _ in range(2):  # warm-up
                for stub in stubs.values():
                    await proxied(stub, "tiny", tokens)
            order = list(stubs)
            for index in range(runs):
                for name in order if index % 2 == 0 else reversed(order):
                    before = cpu_seconds(processes[name])
                    run = await proxied(stubs[name], "tiny", tokens)
                    results[name].append(Measured(run, cpu_seconds(processes[name]) - before))
                async with session.get(f"http://127.0.0.1:{prometheus}/metrics") as response:
                    await response.read()  # a scrape per round, as a Prometheus would
    finally:
        for channel in channels.values():
            await channel.close()
    return results


def report(results: dict[str, list[Measured]], tokens: int) -> int:
    runs = {name: [m.run for m in measured] for name, measured in results.items()}
    if len({run.text for server in runs.values() for run in server}) != 1:
        print("FAIL: the servers returned different texts", file=sys.stderr)
        return 1
    if any(run.tokens != tokens for server in runs.values() for run in server):
        print(f"FAIL: a run did not return {tokens} tokens", file=sys.stderr)
        return 1
    off = results["off"]
    print(f"{len(off)} rounds, alternating; {tokens} tokens per completion")
    print()
    print("| server | tokens/s | time to first token | wall per token vs off | server CPU per token |")
    print("|---|---:|---:|---:|---:|")
    for name, measured in results.items():
        wall = statistics.median(
            (m.run.seconds - base.run.seconds) / tokens * 1e6 for m, base in zip(measured, off, strict=True)
        )
        ttft = statistics.median(m.run.first_token_ms for m in measured)
        # Summed, not a median of each run's: CPU time ticks in 10 ms steps, 20 µs a token for one run.
        cpu = sum(m.cpu_seconds for m in measured) / (tokens * len(measured)) * 1e6
        print(f"| {name} | {median_tps(runs[name]):,.0f} | {ttft:.2f} ms | {wall:+.2f} µs | {cpu:.1f} µs |")
    print()
    print("(medians; server CPU: total CPU time / total tokens; 'vs off': median of paired differences)")
    for name in results:
        if name != "off":
            print(f"throughput ratio ({name} / off): {median_tps(runs[name]) / median_tps(runs['off']):.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--baseline", type=Path, help="a checkout whose server is run as a third path")
    args = parser.parse_args()
    model = ensure_tiny_model()
    backend_args = ["--threads", "1"]
    ctx = args.tokens + 64

    async def run(tmp: Path) -> dict[str, list[Measured]]:
        sink, sink_port = await collector()
        processes = []
        servers: dict[str, tuple[str, int]] = {}
        prometheus = 0
        try:
            for name in ("off", "on", "baseline"):
                state = tmp / name
                state.mkdir()
                env: dict[str, str] = {}
                source = None
                if name == "on":
                    env = {
                        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
                        "OTEL_BSP_SCHEDULE_DELAY": "100",
                        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
                        "LEMONADE_GRPC_PROMETHEUS_LISTEN": "127.0.0.1:0",
                    }
                elif name == "baseline":
                    if args.baseline is None:
                        continue
                    source = args.baseline.resolve()
                with environment(env):
                    server = start_server(state, model, ctx, backend_args, source)
                processes.append(server.process)
                servers[name] = (server.address, server.process.pid)
                if name == "on":
                    prometheus = int(server.log().split("prometheus: http://127.0.0.1:")[1].split("/")[0])
            return await bench(servers, args.runs, args.tokens, prometheus)
        finally:
            for process in processes:
                process.terminate()
                process.wait(30)
            await sink.stop(None)

    with tempfile.TemporaryDirectory(prefix="lemonade-bench-") as tmp:
        return report(asyncio.run(run(Path(tmp))), args.tokens)


if __name__ == "__main__":
    sys.exit(main())
