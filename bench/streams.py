"""What the benches share: a server of tiny-model entries, and one timed stream through each path.

A library of the benches (no bench imports another bench): `Run`, one
streamed completion read from an OpenAI-compatible endpoint (`sse`) or
through `Inference.Complete` (`proxied`), and `start_server` on the harness
that tests and the soak use too (`lemonade_grpc.testing`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

from lemonade_grpc._gen.lemonade.v1 import inference_pb2, inference_pb2_grpc
from lemonade_grpc.testing import ServerProcess, launch, serve_command

PROMPT = "Once upon a time"
SEED = 1234


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
) -> ServerProcess:
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
    return serve(state_dir, config, cwd=source)


def serve(
    state_dir: Path,
    config: Path,
    *,
    python: tuple[str, ...] = (sys.executable, "-m", "lemonade_grpc"),
    log_path: Path | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """A server on `config` and `state_dir` (log: `state_dir/server.log`), once it listens."""
    command = serve_command(state_dir, "--config", str(config), python=python)
    return launch(command, log_path or state_dir / "server.log", state_dir, cwd=cwd, env=env)


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ for the servers started inside (restored after)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
