"""Complete through lemonade-grpc vs. llama-server directly: tokens/s and time to first token.

One run, alternating: the same seeded completion (the bundled tiny model,
500 tokens, end of sequence ignored) is consumed

  (a) directly from llama-server's SSE endpoint by a Python async client
      (aiohttp, one JSON decode per event: what a client of the backend does),
  (b) through `Inference.Complete` by a Python grpc.aio client.

The order alternates every round so that neither path always runs on a
warmer machine. Prints the median tokens/s of each and their ratio, and the
median time to first token of each (request sent to first text received)
and their difference. Targets: ratio >= 0.95, added time to first token <=
1 ms. Usage: `make bench` or `python bench/proxy.py [--runs N] [--tokens N]
[--backend-args ARGS]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import aiohttp
import grpc
from streams import SEED, Run, proxied, sse, start_server

from lemonade_grpc._gen.lemonade.v1 import (
    inference_pb2_grpc,
    model_control_pb2,
    model_control_pb2_grpc,
)
from lemonade_grpc.provision.tiny_model import ensure_tiny_model
from lemonade_grpc.testing import cpu_model


async def direct(session: aiohttp.ClientSession, port: int, tokens: int) -> Run:
    return await sse(session, f"http://127.0.0.1:{port}/v1/completions", "tiny", tokens)


async def bench(address: str, runs: int, tokens: int) -> tuple[list[Run], list[Run]]:
    async with grpc.aio.insecure_channel(address) as channel:
        control = model_control_pb2_grpc.ModelControlStub(channel)
        stub = inference_pb2_grpc.InferenceStub(channel)
        async for progress in control.Load(model_control_pb2.LoadRequest(model="tiny")):
            port = progress.status.port
        # A new connection per request, as the proxy makes: llama-server closes
        # a connection after a streamed response.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            # Warm both paths (connections, the backend's first-request costs).
            for _ in range(2):
                await direct(session, port, tokens)
                await proxied(stub, "tiny", tokens)
            direct_runs: list[Run] = []
            proxy_runs: list[Run] = []
            for index in range(runs):
                if index % 2 == 0:
                    direct_runs.append(await direct(session, port, tokens))
                    proxy_runs.append(await proxied(stub, "tiny", tokens))
                else:
                    proxy_runs.append(await proxied(stub, "tiny", tokens))
                    direct_runs.append(await direct(session, port, tokens))
    return direct_runs, proxy_runs


def report(direct_runs: list[Run], proxy_runs: list[Run], tokens: int, backend_args: str) -> int:
    texts = {run.text for run in direct_runs + proxy_runs}
    if len(texts) != 1:
        print("FAIL: the proxied text differs from the direct text", file=sys.stderr)
        return 1
    if any(run.tokens != tokens for run in direct_runs + proxy_runs):
        print(f"FAIL: a run did not return {tokens} tokens", file=sys.stderr)
        return 1
    d_tps = statistics.median(r.tokens_per_second for r in direct_runs)
    p_tps = statistics.median(r.tokens_per_second for r in proxy_runs)
    d_ttft = statistics.median(r.first_token_ms for r in direct_runs)
    p_ttft = statistics.median(r.first_token_ms for r in proxy_runs)
    added = statistics.median(
        p.first_token_ms - d.first_token_ms for d, p in zip(direct_runs, proxy_runs, strict=True)
    )
    messages = statistics.median(r.messages for r in proxy_runs)
    print(
        f"machine: {os.cpu_count()} CPUs, {cpu_model()}; Python {platform.python_version()},"
        f" grpcio {grpc.__version__}, aiohttp {aiohttp.__version__}"
    )
    print(
        f"{len(direct_runs)} runs each, alternating; {tokens} tokens, seed {SEED}, temperature 0,"
        f" EOS ignored; llama-server args: {backend_args or '(none)'}"
    )
    print()
    print("| path | tokens/s (median) | time to first token (median) |")
    print("|---|---:|---:|")
    print(f"| llama-server SSE, aiohttp client | {d_tps:,.0f} | {d_ttft:.2f} ms |")
    print(f"| Inference.Complete, grpc.aio client | {p_tps:,.0f} | {p_ttft:.2f} ms |")
    print()
    print(f"throughput ratio (proxy / direct): {p_tps / d_tps:.3f}   target >= 0.95")
    print(f"added time to first token (median of paired differences): {added:+.2f} ms   target <= 1 ms")
    print(f"gRPC messages per {tokens}-token completion (median): {messages:.0f} (deltas coalesced)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument(
        "--backend-args",
        default="--threads 1",
        help="extra llama-server arguments for both paths (default: '--threads 1', see docs/performance.md;"
        " '' for llama-server's own defaults)",
    )
    args = parser.parse_args()
    model = ensure_tiny_model()
    with tempfile.TemporaryDirectory(prefix="lemonade-bench-") as tmp:
        server = start_server(
            Path(tmp), model, ctx_size=args.tokens + 64, backend_args=args.backend_args.split()
        )
        try:
            direct_runs, proxy_runs = asyncio.run(bench(server.address, args.runs, args.tokens))
        finally:
            server.stop()
        return report(direct_runs, proxy_runs, args.tokens, args.backend_args)


if __name__ == "__main__":
    sys.exit(main())
