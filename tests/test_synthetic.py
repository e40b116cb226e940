"""Synthetic generators: deterministic, correctly labelled, Countdown solvable by construction."""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

import pytest

from urlvr.data.records import PromptRecord
from urlvr.data.synthetic import arithmetic_problems, countdown_problems, evaluate_expression


# --------------------------------------------------------------------------- arithmetic
def test_arithmetic_is_deterministic_per_seed() -> None:
    assert arithmetic_problems(50, seed=3) == arithmetic_problems(50, seed=3)


def test_arithmetic_distinct_seeds_differ() -> None:
    first = [r.prompt for r in arithmetic_problems(50, seed=0)]
    second = [r.prompt for r in arithmetic_problems(50, seed=1)]
    assert first != second
    assert len(set(first) & set(second)) < 10  # 20k possible questions: overlap is rare


def test_arithmetic_prefix_is_stable() -> None:
    """The first k records do not depend on how many were asked for."""
    assert arithmetic_problems(10, seed=5) == arithmetic_problems(40, seed=5)[:10]


def test_arithmetic_labels_recompute() -> None:
    records = arithmetic_problems(300, seed=7, operators=("+", "-", "*"))
    for record in records:
        assert isinstance(record, PromptRecord)
        match = re.fullmatch(r"Compute (\d+)([+\-*])(\d+)\.", record.prompt)
        assert match, record.prompt
        left, op, right = int(match[1]), match[2], int(match[3])
        expected = {"+": left + right, "-": left - right, "*": left * right}[op]
        assert record.label == str(expected)
        assert record.metadata == {"left": left, "operator": op, "right": right}
    assert {r.metadata["operator"] for r in records} == {"+", "-", "*"}


def test_arithmetic_respects_range_and_ids() -> None:
    records = arithmetic_problems(200, seed=1, min_value=3, max_value=9, operators=("+",))
    values = [r.metadata["left"] for r in records] + [r.metadata["right"] for r in records]
    assert min(values) >= 3 and max(values) <= 9
    ids = [r.prompt_id for r in records]
    assert len(set(ids)) == len(ids) and ids[0] == "arithmetic-s1-000000"


@pytest.mark.parametrize(
    "kwargs",
    [{"operators": ("/",)}, {"operators": ()}, {"min_value": 5, "max_value": 2}],
)
def test_arithmetic_rejects_bad_options(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        arithmetic_problems(3, seed=0, **kwargs)


# --------------------------------------------------------------------------- countdown
def test_countdown_is_deterministic_and_seed_dependent() -> None:
    assert countdown_problems(30, seed=2) == countdown_problems(30, seed=2)
    prompts = {seed: [r.prompt for r in countdown_problems(30, seed=seed)] for seed in (2, 3)}
    assert prompts[2] != prompts[3]


def test_countdown_solvable_by_construction() -> None:
    records = countdown_problems(500, seed=11)
    for record in records:
        numbers, target, solution = (record.metadata[k] for k in ("numbers", "target", "solution"))
        assert record.label == str(target)
        assert 1 <= target <= 100
        assert evaluate_expression(solution) == target
        # every number used exactly once (as a multiset)
        assert Counter(int(n) for n in re.findall(r"\d+", solution)) == Counter(numbers)
        assert f"[{', '.join(map(str, numbers))}]" in record.prompt
        assert f"equals {target}." in record.prompt and "\\boxed{}" in record.prompt
    assert {len(r.metadata["numbers"]) for r in records} == {3, 4}
    assert any("/" in r.metadata["solution"] for r in records)  # division does occur


def test_countdown_options() -> None:
    records = countdown_problems(40, seed=0, num_count=(5,), max_number=9, max_target=50)
    assert all(len(r.metadata["numbers"]) == 5 for r in records)
    assert all(max(r.metadata["numbers"]) <= 9 and r.metadata["target"] <= 50 for r in records)


def test_evaluate_expression_is_exact_and_safe() -> None:
    assert evaluate_expression("6/4*2") == 3
    assert evaluate_expression("(25-(9*2))*14") == 98
    assert evaluate_expression("-3+1") == -2
    assert evaluate_expression("7/2") == Fraction(7, 2)
    for bad in ("2**3", "__import__('os')", "1/0", "x+1", "1.5+1", "(1+"):
        with pytest.raises(ValueError):
            evaluate_expression(bad)


def test_arithmetic_source_operand_range_and_operators_act():
    from urlvr.data.loaders import load_records
    from urlvr.recipe import load_recipe

    recipe = load_recipe({"data": {"source": {"kind": "arithmetic", "num_problems": 50, "seed": 1, "max_value": 9,
                                              "operators": ["+"]}}})
    records = load_records("arithmetic", **recipe.data.source.model_dump(exclude={"kind"}))
    assert all(r.metadata["operator"] == "+" and 0 <= r.metadata["left"] <= 9 and 0 <= r.metadata["right"] <= 9
               for r in records)
    assert len({r.prompt for r in records}) > 20 and all(int(r.label) <= 18 for r in records)
    default = load_records("arithmetic", **load_recipe({}).data.source.model_dump(exclude={"kind"}))
    assert max(r.metadata["left"] for r in default) > 9  # the default stays 0..99, + and -
    import pytest

    from urlvr.errors import RecipeError

    with pytest.raises(RecipeError, match="min_value"):
        load_recipe({"data": {"source": {"kind": "arithmetic", "min_value": 5, "max_value": 2}}})
