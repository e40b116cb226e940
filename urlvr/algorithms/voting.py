"""Majority voting over a group's answers, as pure functions: maj(x), the majority answer(s), and
p_maj, the majority answer's share of the voters. The `majority_vote` reward (`rewards/voting.py`),
the agreement group filter, the dynamics metrics and the evaluation all count votes here.

Ties and missing answers are explicit choices, not accidents of `Counter`:
  * `ties="first"` (default): the tied answer seen first among the voters wins -- deterministic,
    and what `Counter.most_common` does in TTRL's code; `"all"`: every tied answer counts as the
    majority; `"none"`: a tie means no majority.
  * `no_answer="abstain"` (default): samples without an answer do not vote; `"vote"`: "no answer"
    is a candidate like any other; if it wins, there is no majority.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Literal

import torch

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


def majority_ratios(voters: Sequence[Sequence[str | None]]) -> torch.Tensor:
    """p_maj per prompt: the share of voters whose answer is the majority answer (ties go to the
    first seen, samples without an answer count in the denominator); 0 when nobody answered.  -> [B]"""
    out = []
    for group in voters:
        majority = majority_answer(group)
        out.append(0.0 if majority is None else sum(a == majority for a in group) / len(group))
    return torch.tensor(out, dtype=torch.float64)
