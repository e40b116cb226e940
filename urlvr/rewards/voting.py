"""Majority voting (TTRL; paper Table 2): a sample is rewarded for agreeing with its group.

Voters. The vote runs over `ctx.voters`: the trained samples, plus the extra samples drawn only
for voting when the recipe sets `reward.vote_group_size` (TTRL votes with 64 samples and trains
on 32; the trained samples are the first G of the voters, an unbiased subset of i.i.d. draws).

Ties and missing answers are explicit choices, not accidents of `Counter`:
  * `ties="first"` (default): the tied answer seen first among the voters wins -- deterministic,
    and what `Counter.most_common` does in TTRL's code; `"all"`: every tied answer counts as the
    majority; `"none"`: a tie means no majority, every sample scores 0.
  * `no_answer="abstain"` (default): samples without an answer do not vote and score 0;
    `"vote"`: "no answer" is a candidate like any other; if it wins, every sample scores 0.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Literal

from urlvr.rewards.base import RewardContext, RewardOutput, reward
from urlvr.rollout.base import Group

Ties = Literal["first", "all", "none"]
NoAnswer = Literal["abstain", "vote"]
_NO_ANSWER = object()  # the "no answer" candidate when no_answer="vote"


def majority_answers(answers: Sequence[str | None], *, ties: Ties = "first", no_answer: NoAnswer = "abstain") -> set[str]:
    """maj(x) = argmax_a sum_i 1[ans(y_i) = a], as a set (empty when there is no majority).

    With ties="first" the set has at most one element; "all" keeps every tied answer; "none"
    returns the empty set on a tie. When no_answer="vote" and "no answer" wins, the set is empty.
    """
    if ties not in ("first", "all", "none"):
        raise ValueError(f"ties must be 'first', 'all' or 'none', got {ties!r}")
    if no_answer not in ("abstain", "vote"):
        raise ValueError(f"no_answer must be 'abstain' or 'vote', got {no_answer!r}")
    if no_answer == "vote":
        counts = Counter(_NO_ANSWER if a is None else a for a in answers)
    else:
        counts = Counter(a for a in answers if a is not None)
    if not counts:
        return set()
    ranked = counts.most_common()  # stable: equal counts keep first-seen order
    top = ranked[0][1]
    tied = [a for a, c in ranked if c == top]
    if ties == "first":
        winners = tied[:1]
    elif ties == "all":
        winners = tied
    else:
        winners = tied if len(tied) == 1 else []
    return {a for a in winners if a is not _NO_ANSWER}


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The majority answer with the default rules (ties to the first seen, no answer abstains), or None."""
    winners = majority_answers(answers)
    return next(iter(winners)) if winners else None


@reward("majority_vote", family="verdict")
def majority_vote(
    group: Group, ctx: RewardContext, *, ties: Ties = "first", no_answer: NoAnswer = "abstain",
    min_majority_ratio: float = 0.0,
) -> RewardOutput:
    """TTRL: r(y_j) = 1[ans(y_j) = maj(x)]; samples without an answer get 0 (paper Table 2).

    `min_majority_ratio`: when the majority's share of the voters is below it, every sample
    scores 0 (a confidence filter; 0 = off).
    """
    if not 0.0 <= min_majority_ratio <= 1.0:
        raise ValueError(f"min_majority_ratio must lie in [0, 1], got {min_majority_ratio}")
    voters = ctx.voters
    winners = majority_answers(voters, ties=ties, no_answer=no_answer)
    share = max((sum(v == w for v in voters) for w in winners), default=0) / max(1, len(voters))
    if share < min_majority_ratio:
        winners = set()
    scores = [float(a is not None and a in winners) for a in ctx.answers]
    return RewardOutput(scores=scores, diagnostics={"majority_ratio": [share] * len(scores)})
