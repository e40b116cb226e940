"""External rewards: checked against a label or a rule, not the model's own beliefs."""

from __future__ import annotations

from urlvr.rewards.base import RewardContext, reward
from urlvr.rewards.extractors import normalize_answer
from urlvr.rollout.base import Group


@reward("ground_truth", needs_label=True, family="verdict")
def ground_truth(group: Group, ctx: RewardContext) -> list[float]:
    """Oracle: r_gt(y_j) = 1[ans(y_j) = a*] (the supervised RLVR baseline; paper App. B.2)."""
    if ctx.label is None:
        raise ValueError(f"prompt {group.prompt.prompt_id!r} has no label for the ground_truth reward")
    target = normalize_answer(ctx.label)
    return [float(a is not None and a == target) for a in ctx.answers]


@reward("format", family="other")
def answer_format(group: Group, ctx: RewardContext) -> list[float]:
    """1 when an answer could be extracted from the response, else 0."""
    return [float(a is not None) for a in ctx.answers]
