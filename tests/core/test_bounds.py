"""The bounds every input is checked against: ranges, the model-name rule, echoed input."""

from __future__ import annotations

import math

import pytest

from lemonade_grpc.core import bounds


@pytest.mark.parametrize("name", ["tiny", "a", "llama-3.1-8b:q4_k_m", "M" * 128, "0model"])
def test_valid_model_names(name: str) -> None:
    assert bounds.model_name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("", "is required"),
        ("x" * 129, "129 characters long"),
        ("x" * 1_000_000, "1,000,000 characters long"),
        ("../etc", "not a model name"),
        ("a/b", "not a model name"),
        ("-flag", "not a model name"),
        ("a b", "not a model name"),
        ("a\0b", "not a model name"),
        ("é", "not a model name"),
    ],
)
def test_invalid_model_names_say_why_without_echoing_them_whole(name: str, said: str) -> None:
    problem = bounds.model_name_problem(name)
    assert problem is not None
    assert said in problem
    assert len(problem) < 200


def test_echo_cuts_long_input_and_says_how_long_it_was() -> None:
    assert bounds.echo("abc") == "'abc'"
    cut = bounds.echo("y" * 10_000)
    assert cut.startswith("'" + "y" * 64 + "'")
    assert "10,000 characters" in cut
    assert len(cut) < 100


def test_ranges_refuse_nan_bools_and_what_is_outside() -> None:
    assert 0 in bounds.IDLE_UNLOAD_SECONDS
    assert bounds.YEAR in bounds.IDLE_UNLOAD_SECONDS
    assert bounds.YEAR + 1 not in bounds.IDLE_UNLOAD_SECONDS
    assert math.nan not in bounds.HEALTH_TIMEOUT_SECONDS
    assert math.inf not in bounds.HEALTH_TIMEOUT_SECONDS
    assert True not in bounds.MAX_LOADED
    assert "5" not in bounds.MAX_LOADED
    assert str(bounds.CTX_SIZE) == "1..16777216"
    assert str(bounds.HEALTH_TIMEOUT_SECONDS) == "0.1..86400"
