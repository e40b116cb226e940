"""Ensemble rewards: votes across the samples of one group (paper Table 2)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from urlvr.rewards.base import RewardContext, RewardOutput, reward
from urlvr.rollout.base import Group


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """maj(x) = argmax_a sum_j 1[ans(y_j) = a] over samples that have an answer.

    Ties go to the answer that appears first in the group (Counter keeps insertion order), so
    the choice is deterministic. Returns None when no sample has an answer.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    return counts.most_common(1)[0][0]


@reward("majority_vote")
def majority_vote(group: Group, ctx: RewardContext) -> RewardOutput:
    """TTRL: r(y_j) = 1[ans(y_j) = maj(x)]; samples without an answer get 0 (paper Table 2)."""
    majority = majority_answer(ctx.answers)
    scores = [float(a is not None and a == majority) for a in ctx.answers]
    share = sum(scores) / len(scores) if majority is not None else 0.0
    return RewardOutput(scores=scores, diagnostics={"majority_ratio": [share] * len(scores)})
