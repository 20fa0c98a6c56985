"""The example apps (issue 19), run as a user runs them against `make run`'s default models."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from conftest import ServerFactory

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "python"


async def run(example: str, address: str, *args: str) -> list[str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / example),
        *args,
        "--address",
        address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode().splitlines()


async def test_the_rag_example_answers_from_the_document_it_retrieved(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    server = servers.start()
    question, context, answer = await run("rag.py", server.address)
    assert question == "question: What is the capital of France?"
    assert context == "context:  Paris is the capital of France."
    assert "Paris" in answer
    _, context, _ = await run("rag.py", server.address, "Is it raining in London?")
    assert context == "context:  It rained all day in London."


async def test_the_agent_example_calls_its_tool_and_answers_with_the_result(
    servers: ServerFactory, smollm2_model: Path
) -> None:
    """SmolLM2 takes no tools: the agent falls back to a JSON-schema call, which the grammar forces."""
    server = servers.start()
    question, call, result, answer = await run("agent.py", server.address)
    assert question == "question: What is the weather like in Lisbon?"
    assert call == 'tool call (json-schema): get_weather({"city": "Lisbon"})'
    assert result == "tool result: 22 °C and sunny"
    # The answer's words are the model's own (greedy, yet not the same under every load:
    # llama-server's prompt cache changes the arithmetic); that it answers is the app's part.
    assert answer.startswith("answer: ")
    assert len(answer) > len("answer: ")
