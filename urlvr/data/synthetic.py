"""Deterministic synthetic prompts: two-operand arithmetic and Countdown.

Why synthetic data at all: the CPU test suite, the embedded tiny model's warm-up and the smoke
recipes need labelled problems with no network. Every generator takes an explicit seed and draws
only from its own ``random.Random(seed)``, so the same call returns the same records on any
machine and Python version (``random.Random`` is specified to be reproducible across versions
for ``randint``/``choice``/``shuffle`` given the same seed).
"""

from __future__ import annotations

import ast
import operator
import random
from collections.abc import Sequence
from fractions import Fraction

from urlvr.data.records import PromptRecord

ARITHMETIC_OPERATORS = ("+", "-", "*")


def arithmetic_question(left: int, op: str, right: int) -> str:
    """The prompt text for ``left op right``; the tiny model is warmed up on exactly this form."""
    return f"Compute {left}{op}{right}."


def arithmetic_problems(
    num_problems: int,
    seed: int,
    *,
    min_value: int = 0,
    max_value: int = 99,
    operators: Sequence[str] = ("+", "-"),
) -> list[PromptRecord]:
    """``num_problems`` questions ``"Compute a<op>b."`` with operands drawn uniformly from
    ``[min_value, max_value]``; the label is the exact integer result as a string.

    Problems may repeat (sampling is with replacement) so that the distribution does not depend
    on ``num_problems``: the first k records of a larger call equal a call with k.
    """
    if num_problems < 0:
        raise ValueError(f"num_problems must be >= 0, got {num_problems}")
    if min_value > max_value:
        raise ValueError(f"min_value ({min_value}) > max_value ({max_value})")
    unknown = [op for op in operators if op not in ARITHMETIC_OPERATORS]
    if unknown or not operators:
        raise ValueError(
            f"operators must be a non-empty subset of {ARITHMETIC_OPERATORS}, "
            f"got {tuple(operators)}"
        )

    rng = random.Random(seed)
    records = []
    for index in range(num_problems):
        left = rng.randint(min_value, max_value)
        right = rng.randint(min_value, max_value)
        op = rng.choice(tuple(operators))
        answer = {"+": left + right, "-": left - right, "*": left * right}[op]
        records.append(
            PromptRecord(
                prompt_id=f"arithmetic-s{seed}-{index:06d}",
                prompt=arithmetic_question(left, op, right),
                label=str(answer),
                metadata={"left": left, "operator": op, "right": right},
            )
        )
    return records


def countdown_question(numbers: Sequence[int], target: int) -> str:
    """Countdown prompt in the style used by TinyZero and the URLVR paper's Countdown task."""
    listed = ", ".join(str(n) for n in numbers)
    return (
        f"Using the numbers [{listed}], create an equation that equals {target}. "
        "You may use + - * / and each number exactly once. "
        "Put the final equation in \\boxed{}."
    )


def countdown_problems(
    num_problems: int,
    seed: int,
    *,
    num_count: Sequence[int] = (3, 4),
    min_number: int = 1,
    max_number: int = 25,
    max_target: int = 100,
    max_attempts: int = 1000,
) -> list[PromptRecord]:
    """Countdown problems that are solvable by construction.

    For each problem: draw ``k in num_count`` numbers, combine them in random order with random
    ``+ - * /`` into one expression (subtraction kept non-negative, division only when exact),
    and take its value as the target. Draws whose target falls outside ``[1, max_target]`` are
    redrawn. ``metadata`` keeps ``numbers`` (in the order shown), ``target`` and the
    constructing ``solution`` expression, which uses every number exactly once.
    """
    if num_problems < 0:
        raise ValueError(f"num_problems must be >= 0, got {num_problems}")
    if not num_count or min(num_count) < 2:
        raise ValueError(f"num_count must list sizes >= 2, got {tuple(num_count)}")
    if not 1 <= min_number <= max_number:
        raise ValueError(f"need 1 <= min_number <= max_number, got {min_number}, {max_number}")

    rng = random.Random(seed)
    records = []
    for index in range(num_problems):
        for _ in range(max_attempts):
            count = rng.choice(tuple(num_count))
            numbers = [rng.randint(min_number, max_number) for _ in range(count)]
            target, solution = _random_expression(numbers, rng)
            if 1 <= target <= max_target:
                break
        else:
            raise ValueError(
                f"no target in [1, {max_target}] after {max_attempts} draws; widen max_target"
            )
        records.append(
            PromptRecord(
                prompt_id=f"countdown-s{seed}-{index:06d}",
                prompt=countdown_question(numbers, target),
                label=str(target),
                metadata={"numbers": list(numbers), "target": target, "solution": solution},
            )
        )
    return records


def _random_expression(numbers: Sequence[int], rng: random.Random) -> tuple[int, str]:
    """Fold the numbers, in a shuffled order, into one expression; return (value, text).

    Picks two random operands at a time (so the tree shape varies, not just left-deep chains).
    Operand order is chosen so that ``-`` never goes negative and ``/`` is always exact, which
    keeps every intermediate a non-negative integer, as in the classic game.
    """
    items: list[tuple[int, str]] = [(n, str(n)) for n in numbers]
    rng.shuffle(items)
    while len(items) > 1:
        i, j = sorted(rng.sample(range(len(items)), 2))
        (a, a_text), (b, b_text) = items[i], items[j]
        if a < b:
            (a, a_text), (b, b_text) = (b, b_text), (a, a_text)
        choices = ["+", "-", "*"] + (["/"] if b != 0 and a % b == 0 else [])
        op = rng.choice(choices)
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
        combined = (value, f"{_wrap(a_text)}{op}{_wrap(b_text)}")
        items = [item for k, item in enumerate(items) if k not in (i, j)] + [combined]
    value, text = items[0]
    return value, text


def _wrap(text: str) -> str:
    """Parenthesise compound sub-expressions; bare numbers stay bare."""
    return text if text.isdigit() else f"({text})"


_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def evaluate_expression(expression: str) -> Fraction:
    """Exact value of an expression of integers, ``+ - * /`` and parentheses.

    Uses ``Fraction`` so that ``/`` is exact and ``6/4*2 == 3`` holds; anything else (names,
    calls, powers) raises ``ValueError`` instead of being evaluated.
    """

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = walk(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError(f"division by zero in {expression!r}")
            return _BINARY_OPS[type(node.op)](left, right)
        raise ValueError(f"not a plain arithmetic expression: {expression!r}")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"cannot parse {expression!r}: {err.msg}") from None
    return walk(tree)
