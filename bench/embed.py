"""Embed through lemonade-grpc vs. llama-server's /v1/embeddings directly: a 32-text batch, alternating.

One run on the default model (SmolLM2-135M-Instruct started to embed, as
`smollm2-embed` is): the same batch of 32 texts is embedded

  (a) directly by llama-server's `/v1/embeddings`, from a Python async
      client (aiohttp, one JSON decode: what a client of the backend does),
  (b) through `Inference.Embed` by a Python grpc.aio client,

the order alternating every round. Prints the median time of each, their
ratio (direct / proxied: the proxied path's speed relative to the direct
one; target >= 0.95), and checks that both paths give the same vectors.
Usage: `.venv/bin/python bench/embed.py [--rounds N]`; kept in
`results/embed-<date>.txt`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc
from streams import serve

from lemonade_grpc._gen.lemonade.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    model_control_pb2,
    model_control_pb2_grpc,
)
from lemonade_grpc.provision import smollm2
from lemonade_grpc.testing import cpu_model

TOPICS = ["the sea", "a small town", "winter", "trains", "an old library", "coffee", "mountains", "a market"]
BATCH = [
    f"Text {i}: a short paragraph about {TOPICS[i % len(TOPICS)]}, written for test number {i}."
    for i in range(32)
]


async def direct(session: aiohttp.ClientSession, port: int) -> tuple[float, list[list[float]]]:
    started = time.perf_counter()
    async with session.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": BATCH}) as response:
        answer = await response.json()
    seconds = time.perf_counter() - started
    return seconds, [d["embedding"] for d in sorted(answer["data"], key=lambda d: d["index"])]


async def proxied(stub: inference_pb2_grpc.InferenceAsyncStub) -> tuple[float, list[list[float]]]:
    started = time.perf_counter()
    answer = await stub.Embed(inference_pb2.EmbedRequest(model="embed", inputs=BATCH))
    seconds = time.perf_counter() - started
    return seconds, [list(e.values) for e in answer.embeddings]


def largest_difference(a: list[list[float]], b: list[list[float]]) -> float:
    """The largest difference between two lists of vectors' numbers (float32 on one side)."""
    return max(abs(x - y) for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True))


async def bench(address: str, rounds: int) -> tuple[list[float], list[float], float]:
    async with grpc.aio.insecure_channel(address) as channel:
        control = model_control_pb2_grpc.ModelControlStub(channel)
        stub = inference_pb2_grpc.InferenceStub(channel)
        async for progress in control.Load(model_control_pb2.LoadRequest(model="embed")):
            port = progress.status.port
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            for _ in range(2):  # warm both paths
                await direct(session, port)
                await proxied(stub)
            direct_times: list[float] = []
            proxied_times: list[float] = []
            difference = 0.0
            for index in range(rounds):
                if index % 2 == 0:
                    direct_seconds, direct_vectors = await direct(session, port)
                    proxied_seconds, proxied_vectors = await proxied(stub)
                else:
                    proxied_seconds, proxied_vectors = await proxied(stub)
                    direct_seconds, direct_vectors = await direct(session, port)
                direct_times.append(direct_seconds)
                proxied_times.append(proxied_seconds)
                difference = max(difference, largest_difference(direct_vectors, proxied_vectors))
    return direct_times, proxied_times, difference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    model = smollm2.ensure()
    with tempfile.TemporaryDirectory(prefix="lemonade-embed-bench-") as tmp:
        state = Path(tmp)
        config = state / "bench.toml"
        config.write_text(f'[models.embed]\npath = "{model}"\ntype = "embedding"\nctx_size = 2048\n')
        server = serve(state, config)
        try:
            direct_times, proxied_times, difference = asyncio.run(bench(server.address, args.rounds))
        finally:
            server.stop()
    d, p = statistics.median(direct_times), statistics.median(proxied_times)
    lines = [
        f"lemonade-grpc Embed bench, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"machine: {cpu_model()}; Python {platform.python_version()}, grpcio {grpc.__version__}",
        "model: SmolLM2-135M-Instruct Q4_1 started to embed (pooling last, ctx 2048)",
        f"batch of {len(BATCH)} texts; {args.rounds} rounds, the order alternating",
        f"direct /v1/embeddings: median {d * 1000:.1f} ms",
        f"through Inference.Embed: median {p * 1000:.1f} ms",
        f"ratio (direct / proxied, target >= 0.95): {d / p:.3f}",
        f"largest difference between the two paths' vectors: {difference:.2e}",
    ]
    print("\n".join(lines))
    out = Path(__file__).with_name("results") / f"embed-{datetime.date.today()}.txt"
    out.write_text("\n".join(lines) + "\n")
    # The proxied vectors are float32 (the proto's `float`); llama-server's JSON has more digits.
    return 0 if d / p >= 0.95 and difference < 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
