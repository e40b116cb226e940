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

from typing import Annotated

from pydantic import Field

from urlvr.algorithms.voting import NoAnswer, Ties, majority_answer, majority_answers  # noqa: F401  (majority_answer: its old home)
from urlvr.rewards.base import RewardContext, RewardOutput, reward
from urlvr.rollout.base import Group


@reward("majority_vote", family="verdict")
def majority_vote(
    group: Group, ctx: RewardContext, *, ties: Ties = "first", no_answer: NoAnswer = "abstain",
    min_majority_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0,
) -> RewardOutput:
    """TTRL: r(y_j) = 1[ans(y_j) = maj(x)]; samples without an answer get 0 (paper Table 2).

    `ties`: which answers win when several share the top count: `first` (the first one seen),
    `all` (each of them), `none` (no winner: every sample scores 0).
    `no_answer`: `abstain` (samples without an answer do not vote) or `vote` ("no answer" is a
    candidate; when it wins there is no majority and every sample scores 0).
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
