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
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import orjson

from lemonade_grpc._gen.lemonade.v1 import (
    inference_pb2,
    inference_pb2_grpc,
    model_control_pb2,
    model_control_pb2_grpc,
)
from lemonade_grpc.provision.tiny_model import ensure_tiny_model

PROMPT = "Once upon a time"
SEED = 1234
LISTENING = re.compile(rb"listening on ([0-9.]+):(\d+)")


@dataclass(frozen=True)
class Run:
    tokens: int
    seconds: float  # request sent to last token received
    first_token_ms: float
    text: str
    messages: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


async def direct(session: aiohttp.ClientSession, port: int, tokens: int) -> Run:
    return await sse(session, f"http://127.0.0.1:{port}/v1/completions", "tiny", tokens)


async def sse(session: aiohttp.ClientSession, url: str, model: str, tokens: int) -> Run:
    """One streamed completion from an OpenAI-compatible endpoint, read as a client of it reads it."""
    body = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": tokens,
        "temperature": 0,
        "seed": SEED,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    texts: list[str] = []
    first = 0.0
    started = time.perf_counter()
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = orjson.loads(line[6:])  # the fastest decoder: the peers' clients pay no more than needed
            choices = event.get("choices") or ()
            if choices and choices[0].get("text"):
                if not first:
                    first = time.perf_counter()
                texts.append(choices[0]["text"])
    ended = time.perf_counter()
    return Run(len(texts), ended - started, (first - started) * 1000, "".join(texts), len(texts))


async def proxied(stub: inference_pb2_grpc.InferenceAsyncStub, model: str, tokens: int) -> Run:
    request = inference_pb2.CompleteRequest(
        model=model, prompt=PROMPT, max_tokens=tokens, temperature=0, seed=SEED, ignore_eos=True
    )
    texts: list[str] = []
    count = messages = 0
    first = 0.0
    started = time.perf_counter()
    async for reply in stub.Complete(request):
        if reply.text:
            if not first:
                first = time.perf_counter()
            texts.append(reply.text)
            count += reply.token_count
            messages += 1
    ended = time.perf_counter()
    return Run(count, ended - started, (first - started) * 1000, "".join(texts), messages)


def start_server(
    state_dir: Path,
    model: Path,
    ctx_size: int,
    backend_args: list[str],
    source: Path | None = None,
    names: tuple[str, ...] = ("tiny",),
) -> tuple[subprocess.Popen[bytes], str, Path]:
    """A server with catalog models `names`, each the tiny model.

    `source`: run the package of that checkout instead of this one.
    """
    config = state_dir / "bench.toml"
    config.write_text(
        "".join(
            f'[models.{name}]\nrecipe = "llamacpp"\npath = "{model}"\nctx_size = {ctx_size}\n'
            f"args = {json.dumps(backend_args)}\n"
            for name in names
        )
    )
    log_path = state_dir / "server.log"
    process, address = launch(
        [sys.executable, "-m", "lemonade_grpc"], state_dir, config, log_path, cwd=source
    )
    return process, address, log_path


def launch(
    python: list[str],
    state_dir: Path,
    config: Path,
    log_path: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """`python ... serve` on a free loopback port, output to `log_path`; the process and its address.

    `python`: how to run the package (`[python, "-m", "lemonade_grpc"]`);
    `cwd`: a checkout to run it from (`python -m` imports from there first).
    """
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *python,
                *("serve", "--listen", "127.0.0.1:0"),
                *("--state-dir", str(state_dir), "--config", str(config)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
        )
    deadline = time.monotonic() + 60
    while not (match := LISTENING.search(log_path.read_bytes())):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise SystemExit(f"server did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    return process, f"{match.group(1).decode()}:{match.group(2).decode()}"


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


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


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
        process, address, _ = start_server(
            Path(tmp), model, ctx_size=args.tokens + 64, backend_args=args.backend_args.split()
        )
        try:
            direct_runs, proxy_runs = asyncio.run(bench(address, args.runs, args.tokens))
        finally:
            process.terminate()
            process.wait(30)
        return report(direct_runs, proxy_runs, args.tokens, args.backend_args)


if __name__ == "__main__":
    sys.exit(main())
