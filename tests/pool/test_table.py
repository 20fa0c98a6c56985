"""The model table is the one writer of a model's state, pin and options (issue 20).

Read from the package's source: a change made anywhere else would skip the
transition check or the event that tells Watch (llama-swap's single writer,
made structural rather than a convention).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lemonade_grpc
from lemonade_grpc.pool import table

PACKAGE = Path(lemonade_grpc.__file__).parent
WRITER = Path(table.__file__)
OWNED = {"state", "pinned", "options"}


def assignments(path: Path) -> list[tuple[int, str]]:
    """Every `X.state = ...`, `X.pinned = ...`, `X.options = ...` (plain, augmented, annotated) in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        for target in targets:
            for part in ast.walk(target):
                if isinstance(part, ast.Attribute) and part.attr in OWNED:
                    found.append((node.lineno, ast.unparse(part)))
    return found


def model_writes(path: Path) -> list[tuple[int, str]]:
    """The assignments that may be to a pool model's fields: `self.X` of another class is not one."""
    return [(line, text) for line, text in assignments(path) if not text.startswith("self.")]


# Packages that cannot reach a model: the stubs, and the client (an import contract keeps it off
# the pool; it fills protobuf requests, whose `pinned` is no model's).
ELSEWHERE = {"_gen", "client"}


def test_only_the_table_assigns_a_models_state_pin_or_options() -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): writes
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != WRITER
        and not ELSEWHERE & set(path.relative_to(PACKAGE).parts)
        and (writes := model_writes(path))
    }
    assert offenders == {}


def test_the_table_does_assign_them() -> None:
    """The check above reads what it means to: the writer's own assignments are found."""
    written = {text.split(".")[-1] for _, text in model_writes(WRITER)}
    assert written == OWNED


@pytest.mark.parametrize(
    "source",
    [
        "model.state = READY",
        "m.pinned = True",
        "running.options: Options = x",
        "a.b.state += 1",
        "x, y.pinned = 1, 2",
    ],
)
def test_each_form_of_assignment_is_caught(tmp_path: Path, source: str) -> None:
    module = tmp_path / "offender.py"
    module.write_text(source + "\n", encoding="utf-8")
    assert model_writes(module)
