"""Helpers for tests of the telemetry of `serve`: a run that should fail to start, JSON lines, a scrape."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from lemonade_grpc.testing import TAG_VAR, serve_command, tagged_processes

WAIT_SECONDS = 15.0
UNREACHABLE_OTLP = "http://127.0.0.1:9"  # the discard port: connection refused


def run_serve(tmp_path: Path, env: dict[str, str], seconds: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `serve` with `env` added, expecting it to exit on its own (a start-up error)."""
    tag = os.urandom(8).hex()
    try:
        return subprocess.run(
            serve_command(tmp_path / "state"),
            env={**os.environ, **env, TAG_VAR: tag},
            capture_output=True,
            text=True,
            timeout=seconds,
        )
    finally:
        leaked = tagged_processes({tag})
        for process in leaked:
            process.kill()
        assert not leaked


def not_json(text: str) -> list[str]:
    bad = []
    for line in text.splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            bad.append(line)
    return bad


def prometheus_port(log: str) -> int:
    match = re.search(r"prometheus: http://127\.0\.0\.1:(\d+)/metrics", log)
    assert match, log
    return int(match.group(1))


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())
