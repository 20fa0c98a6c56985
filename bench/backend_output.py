"""A ready backend that logs a lot: tokens/s when it writes 64 KiB of stderr per token (issue 18 finding 7).

Starts tests/fake_backend.py through `Backend.launch` (the `command`
recipe, the real output pump and log file), streams `--tokens` tokens
from it once quiet and once with `--stderr-bytes-per-token` bytes of
stderr before each token, alternating, `--rounds` times, and prints the
medians and their ratio. Before the fix the pump read one 64 KiB chunk per
50 ms while the backend was ready, so such a backend blocked in write():
about 20 tokens/s.

    .venv/bin/python bench/backend_output.py [--tokens 400] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lemonade_grpc.backends.backend import Backend
from lemonade_grpc.core.catalog import ModelSpec, ModelType, Recipe
from lemonade_grpc.core.options import EffectiveOptions

ROOT = Path(__file__).resolve().parent.parent
FAKE_BACKEND = ROOT / "tests" / "fake_backend.py"
OPTIONS = EffectiveOptions(ctx_size=256, idle_unload_seconds=None, backend_args=())


def spec(name: str, model: Path, *flags: str) -> ModelSpec:
    command = (sys.executable, str(FAKE_BACKEND), "--port", "{port}", "--model", "{path}", *flags)
    defaults = EffectiveOptions(ctx_size=256, idle_unload_seconds=None, backend_args=())
    return ModelSpec(
        name=name, recipe=Recipe.COMMAND, path=model, type=ModelType.LLM, defaults=defaults, command=command
    )


async def tokens_per_second(backend: Backend, tokens: int) -> float:
    started = time.perf_counter()
    seen = 0
    async for batch in backend.client.stream("/v1/completions", {"prompt": "p", "max_tokens": tokens}):
        seen += sum(1 for chunk in batch if chunk.text)
    elapsed = time.perf_counter() - started
    assert seen == tokens, f"{seen} of {tokens} tokens"
    return tokens / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stderr-bytes-per-token", type=int, default=65536)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        model = work / "model.bin"
        model.write_bytes(b"fake")
        launch = {"log_dir": work / "logs", "registry": None, "health_timeout": 30.0, "stop_grace": 2.0}
        quiet = await Backend.launch(spec("quiet", model), OPTIONS, **launch)  # type: ignore[arg-type]
        loud = await Backend.launch(
            spec("loud", model, "--stderr-bytes-per-token", str(args.stderr_bytes_per_token)),
            OPTIONS,
            **launch,  # type: ignore[arg-type]
        )
        try:
            rates: dict[str, list[float]] = {"quiet": [], "loud": []}
            for _ in range(args.rounds):
                rates["quiet"].append(await tokens_per_second(quiet, args.tokens))
                rates["loud"].append(await tokens_per_second(loud, args.tokens))
        finally:
            await asyncio.gather(quiet.stop(2.0), loud.stop(2.0))
        logged = (work / "logs" / "loud.log").stat().st_size
    quiet_rate = statistics.median(rates["quiet"])
    loud_rate = statistics.median(rates["loud"])
    print(f"tokens per stream: {args.tokens}, rounds: {args.rounds}")
    print(f"quiet backend: {quiet_rate:,.1f} tokens/s (median)")
    print(f"{args.stderr_bytes_per_token} B of stderr per token: {loud_rate:,.1f} tokens/s (median)")
    print(f"ratio loud/quiet: {loud_rate / quiet_rate:.3f}; loud backend's log: {logged:,} bytes")


if __name__ == "__main__":
    asyncio.run(main())
