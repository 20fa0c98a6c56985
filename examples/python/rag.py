"""Retrieval-augmented answering on lemonade-grpc's default models (`make run`).

Embeds a few documents and the question with `smollm2-embed`, ranks the
documents by cosine similarity (the vectors are unit length: a dot
product), and asks `smollm2` to answer from the best one.

    .venv/bin/python examples/python/rag.py ["question"] [--address HOST:PORT]
"""

from __future__ import annotations

import argparse
import asyncio

from lemonade_grpc.client import connect

DOCUMENTS = [
    "The cat sat on the mat and purred.",
    "Paris is the capital of France.",
    "Python is a popular programming language.",
    "The stock market fell sharply today.",
    "It rained all day in London.",
]


async def answer(address: str, question: str) -> tuple[str, str]:
    """The document chosen for `question`, and the model's answer from it."""
    async with connect(address) as client:
        *documents, query = await client.embed("smollm2-embed", [*DOCUMENTS, question])
        scores = [sum(q * d for q, d in zip(query, document, strict=True)) for document in documents]
        best = DOCUMENTS[scores.index(max(scores))]
        messages = [
            ("system", f"Answer in one sentence, using only this context: {best}"),
            ("user", question),
        ]
        text = "".join([r.text async for r in client.chat("smollm2", messages, temperature=0, max_tokens=48)])
    return best, " ".join(text.split())  # one line, whatever the model wrote


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="What is the capital of France?")
    parser.add_argument("--address", default="127.0.0.1:50051")
    args = parser.parse_args()
    context, text = asyncio.run(answer(args.address, args.question))
    print(f"question: {args.question}\ncontext:  {context}\nanswer:   {text}")


if __name__ == "__main__":
    main()
