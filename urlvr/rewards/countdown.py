"""Countdown (TinyZero; the paper's §7 task): the answer must use the given numbers and equal the target.

    r(y) = 1 if expr(y) uses each given number exactly once and evaluates to the target,
           format_score if an answer was extracted but fails, 0 if there is none.

The expression is the model's text, so it is evaluated by `safe_evaluate`, never `eval`: a
character whitelist, a length cap, a nesting cap and a node cap come *before* `ast.parse`; the
AST walk accepts only integer literals, + - * / (and, if asked, ** with a small integer
exponent), and exact `Fraction` arithmetic refuses values over `MAX_VALUE_BITS`. So
`9**9**9**9`, a million-digit integer, deeply nested parentheses and `__import__('os')` are all
refused in microseconds, and scored 0.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from urlvr.rewards.base import RewardContext, RewardOutput, reward
from urlvr.rollout.base import Group

MAX_EXPRESSION_CHARS = 256
MAX_NESTING = 32
MAX_NODES = 128
MAX_VALUE_BITS = 256  # numerator and denominator of every intermediate value
MAX_EXPONENT = 16
_ALLOWED_CHARS = re.compile(r"^[0-9+\-*/().\s]*$")
_LATEX = [("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("×", "*"), ("÷", "/"), ("−", "-"),
          ("\\left", ""), ("\\right", ""), ("\\(", ""), ("\\)", "")]


class UnsafeExpression(ValueError):
    """The text is not a small arithmetic expression (or its value leaves the bounds)."""


def safe_evaluate(expression: str, *, allow_power: bool = False) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the integer literals it uses, in order.

    Raises UnsafeExpression for anything else: other characters or names, over-long or
    over-nested text, division by zero, a power when not allowed (or with a large or
    non-integer exponent), or an intermediate value over MAX_VALUE_BITS bits.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise UnsafeExpression(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    if not _ALLOWED_CHARS.match(expression):
        raise UnsafeExpression("only digits, + - * / ( ) and spaces are allowed")
    depth = deepest = 0
    for char in expression:
        depth += (char == "(") - (char == ")")
        deepest = max(deepest, depth)
    if deepest > MAX_NESTING:
        raise UnsafeExpression(f"parentheses nested deeper than {MAX_NESTING}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise UnsafeExpression(f"does not parse: {type(err).__name__}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise UnsafeExpression(f"more than {MAX_NODES} syntax nodes")
    literals: list[int] = []
    value = _walk(tree.body, literals, allow_power)
    return value, literals


def _walk(node: ast.AST, literals: list[int], allow_power: bool) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        literals.append(node.value)
        return _bounded(Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _walk(node.operand, literals, allow_power)
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp):
        left = _walk(node.left, literals, allow_power)
        right = _walk(node.right, literals, allow_power)
        if isinstance(node.op, ast.Add):
            return _bounded(left + right)
        if isinstance(node.op, ast.Sub):
            return _bounded(left - right)
        if isinstance(node.op, ast.Mult):
            return _bounded(left * right)
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise UnsafeExpression("division by zero")
            return _bounded(left / right)
        if isinstance(node.op, ast.Pow) and allow_power:
            if right.denominator != 1 or abs(right) > MAX_EXPONENT:
                raise UnsafeExpression(f"exponent must be an integer of magnitude <= {MAX_EXPONENT}")
            bits = max(left.numerator.bit_length(), left.denominator.bit_length())
            if bits * abs(int(right)) > MAX_VALUE_BITS:  # checked before computing, not after
                raise UnsafeExpression(f"power exceeds {MAX_VALUE_BITS} bits")
            if left == 0 and right < 0:
                raise UnsafeExpression("division by zero")
            return _bounded(left ** int(right))
    raise UnsafeExpression(f"{type(node).__name__} is not allowed")


def _bounded(value: Fraction) -> Fraction:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_VALUE_BITS:
        raise UnsafeExpression(f"value exceeds {MAX_VALUE_BITS} bits")
    return value


def clean_expression(answer: str, target: int | Fraction | None = None, allow_equals: bool = True) -> str:
    """The expression part of an answer: LaTeX operators mapped to + - * /, braces to parentheses,
    and (allow_equals) a trailing `= <target>` removed. A different right-hand side is refused."""
    text = answer
    for latex, plain in _LATEX:
        text = text.replace(latex, plain)
    text = text.replace("{", "(").replace("}", ")")
    if "=" in text:
        if not allow_equals or text.count("=") > 1:
            raise UnsafeExpression("an equation, not an expression")
        text, rhs = text.split("=")
        if target is not None and safe_evaluate(rhs)[0] != target:
            raise UnsafeExpression("the right-hand side is not the target")
    return text


def check_countdown(answer: str, numbers: Sequence[int], target: int, *, use_all: bool = True,
                    allow_power: bool = False, allow_equals: bool = True) -> bool:
    """True when `answer` evaluates exactly to `target` using the numbers as the rules demand."""
    try:
        value, used = safe_evaluate(clean_expression(answer, target, allow_equals), allow_power=allow_power)
    except UnsafeExpression:
        return False
    wanted, have = Counter(int(n) for n in numbers), Counter(used)
    fits = have == wanted if use_all else not (have - wanted)
    return fits and value == target


def countdown_problem(metadata: dict[str, Any], numbers_field: str, target_field: str) -> tuple[list[int], int]:
    """(numbers, target) from a prompt record's metadata (lists may be stored as JSON strings)."""
    if numbers_field not in metadata or target_field not in metadata:
        raise ValueError(f"countdown needs metadata fields {numbers_field!r} and {target_field!r} "
                         f"(this prompt has {sorted(metadata)}); set numbers_field / target_field")
    numbers = metadata[numbers_field]
    numbers = json.loads(numbers) if isinstance(numbers, str) else numbers
    return [int(n) for n in numbers], int(metadata[target_field])


@reward("countdown", family="verdict")
def countdown(
    group: Group, ctx: RewardContext, *, format_score: float = 0.0, use_all: bool = True,
    allow_power: bool = False, allow_equals: bool = True, numbers_field: str = "numbers", target_field: str = "target",
) -> RewardOutput:
    """Countdown: r(y) = 1[expr uses each number once and equals the target], format_score if wrong, 0 if none.

    TinyZero's scorer (the paper's oracle for §7) uses format_score=0.1, use_all=True and refuses
    equations (allow_equals=False); the Jiayi-Pan/Countdown-Tasks-3to4 columns are `nums`, `target`.
    The numbers and target come from the prompt's metadata: they are part of the question, not a label.

    `format_score`: the score of a wrong answer that was extracted, in [0, 0.5).
    `use_all`: every number must be used exactly once (false: each at most once).
    `allow_power`: `**` and `^` count as operators.
    `allow_equals`: an answer `expr = target` is read as `expr` (false: an equation is wrong).
    `numbers_field`: the prompt metadata key of the numbers (a list, or a JSON string of one).
    `target_field`: the prompt metadata key of the target.
    """
    numbers, target = countdown_problem(dict(ctx.metadata), numbers_field, target_field)
    correct = [a is not None and check_countdown(a, numbers, target, use_all=use_all, allow_power=allow_power,
                                                  allow_equals=allow_equals) for a in ctx.answers]
    scores = [1.0 if ok else (format_score if a is not None else 0.0) for ok, a in zip(correct, ctx.answers)]
    return RewardOutput(scores=scores, diagnostics={"correct": [float(ok) for ok in correct]})


def _check(*, format_score: float = 0.0, **_: Any) -> None:
    """A verdict reward: > 0.5 must mean "correct" (Reward Accuracy and `eval.judge` read it so)."""
    if not 0.0 <= format_score < 0.5:
        raise ValueError(f"countdown: format_score must lie in [0, 0.5) (a wrong answer must score below 0.5), got {format_score}")


countdown.check = _check  # type: ignore[attr-defined]
