"""Self-verification (paper §7, App. C.1): the current policy judges each of its own answers.

    r(y) = 1[ the policy, shown prompt P(expr = ans(y), nums, target), answers \\boxed{True} ]

Generation is hard, checking is easy: the policy is asked to verify each candidate with prompt P1
(adapted from RLSR) or P2 (the paper's main prompt, §7), or a prompt of the recipe's own. All
verification prompts of a step go through the rollout engine in one batched call (this reward's
batch phase, `prepare`), then each group reads its verdicts. A sample with no extracted answer
scores 0 without being sent; a verdict that is neither True nor False scores 0 (and is counted).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import Field

from urlvr.rewards.base import PolicyHandle, RewardContext, RewardOutput, reward
from urlvr.rewards.extractors import last_boxed_content, normalize_answer
from urlvr.rollout.base import Group

# App. C.1, verbatim apart from doubled braces (these are format strings)
PROMPT_1 = """Verify:
1. "{expr}" only contains numbers from {nums}.
2. Every number from {nums} is used in "{expr}" and is used only once.
3. "{expr}" is a valid arithmetic expression and not an equation.
4. "{expr}" equals {target}.
If all checks pass, return \\boxed{{True}}; otherwise, return \\boxed{{False}}."""

PROMPT_2 = """You are a strict mathematical verifier. Your task is to check whether the given expression
correctly solves the arithmetic puzzle.
Do NOT attempt to find or generate a new expression yourself. You must only analyze and
evaluate the provided expression "{expr}".
Verification steps:
1. If "{expr}" is missing, empty, or not a valid arithmetic expression (for example, if it contains
words instead of numbers and operators), immediately output \\boxed{{False}} and your task
is over.
2. Check that "{expr}" only uses numbers from {nums}.
3. Each number from {nums} must appear exactly once in "{expr}".
4. The expression must contain only valid arithmetic operators: +, -, *, /, and parentheses.
5. Evaluate "{expr}" numerically. If the computed result equals {target} (within a tolerance of
1e-6), it passes this check.
If and only if all checks pass, output \\boxed{{True}}. Otherwise, output \\boxed{{False}}."""

PROMPTS = {"p1": PROMPT_1, "p2": PROMPT_2}
FIELDS = ("expr", "nums", "target", "question", "response")  # what a prompt may refer to


def verification_prompt(prompt: str) -> str:
    """The template for `prompt`: "p1", "p2", or a format string using some of FIELDS."""
    return PROMPTS.get(prompt, prompt)


def _check(*, prompt: str = "p2", **_: Any) -> None:
    template = verification_prompt(prompt)
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(f"self_verification: prompt is not a valid format string ({err}); "
                         "write literal braces as {{ and }}") from None
    unknown = sorted(fields - set(FIELDS))
    if unknown or not fields:
        raise ValueError(f"self_verification: prompt must be 'p1', 'p2' or a format string using "
                         f"{', '.join('{' + f + '}' for f in FIELDS)}; got fields {unknown or 'none'}")


def parse_verdict(text: str) -> bool | None:
    """The verdict in the last \\boxed{}: True, False, or None when it is neither."""
    content = last_boxed_content(text)
    verdict = normalize_answer(content).lower() if content is not None else ""
    return {"true": True, "false": False}.get(verdict)


def _ask_policy(
    groups: Sequence[Group], contexts: Sequence[RewardContext], policy: PolicyHandle | None, *,
    prompt: str = "p2", max_new_tokens: int | None = 512, temperature: float = 0.0,
    numbers_field: str = "numbers", target_field: str = "target",
) -> list[list[str | None]]:
    """Batch phase: one generate call for every answered sample of the step; verdict texts per group."""
    if policy is None:
        raise ValueError("self_verification needs the trainer's policy handle (ctx.policy)")
    template = verification_prompt(prompt)
    requests, where = [], []
    for g, (group, ctx) in enumerate(zip(groups, contexts, strict=True)):
        metadata = dict(ctx.metadata)
        for j, (sample, answer) in enumerate(zip(group.samples, ctx.answers, strict=True)):
            if answer is None:
                continue
            fields = {"expr": answer, "question": ctx.question or "", "response": sample.text,
                      "nums": metadata.get(numbers_field, ""), "target": metadata.get(target_field, "")}
            requests.append(template.format_map(fields))
            where.append((g, j))
    # called even with no requests: every rank makes the same calls (ZeRO-3 gathers collectively)
    outputs = policy.generate(requests, max_new_tokens=max_new_tokens, temperature=temperature)
    verdicts: list[list[str | None]] = [[None] * group.size for group in groups]
    for (g, j), texts in zip(where, outputs, strict=True):
        verdicts[g][j] = texts[0]
    return verdicts


@reward("self_verification", prepare=_ask_policy, family="verdict")
def self_verification(
    group: Group, ctx: RewardContext, *, prompt: str = "p2", max_new_tokens: Annotated[int | None, Field(ge=1)] = 512,
    temperature: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0, numbers_field: str = "numbers", target_field: str = "target",
) -> RewardOutput:
    """Self-verification: r(y) = 1[policy's verdict on ans(y) under prompt P1/P2 is \\boxed{True}] (§7, App. C.1).

    `prompt`: "p1", "p2" (default; the prompt of the paper's §7 runs) or a format string over
    {expr} {nums} {target} {question} {response}. `temperature` 0 = greedy verdicts (the paper
    does not state the verifier's sampling); `max_new_tokens` null = the rollout budget.
    `numbers_field`: the prompt metadata key of the Countdown numbers ({nums}).
    `target_field`: the prompt metadata key of the Countdown target ({target}).
    """
    texts = ctx.prepared if ctx.prepared is not None else [None] * group.size
    verdicts = [parse_verdict(t) if t is not None else None for t in texts]
    return RewardOutput(
        scores=[float(v is True) for v in verdicts],
        diagnostics={"unparsed_verdict": [float(t is not None and v is None) for t, v in zip(texts, verdicts)]},
    )


self_verification.check = _check  # type: ignore[attr-defined]
