"""Semantic-cluster reward (EMPO; paper Table 2 and App. A.5, Eq. 37).

r(y) = |C(y)| / G: the share of the group whose answer is equivalent to y's. Equivalence is
math-verify's (`\\frac{1}{2}`, `0.5` and `1/2` form one cluster) or exact string equality of the
normalised answers. Clusters are built greedily against each cluster's first member, as in
EMPO's code. When the recipe draws extra voting samples, clusters and G run over all voters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Literal

from urlvr.rewards.base import RewardContext, RewardOutput, reward
from urlvr.rollout.base import Group

Equivalence = Literal["math_verify", "exact"]


def answer_clusters(
    answers: Sequence[str | None], equivalence: Equivalence = "exact", timeout_s: float = 5.0
) -> tuple[list[int | None], int]:
    """(cluster id per answer, None for no answer; failed/timed-out equivalence checks)."""
    from urlvr.rewards.math_verify import cluster_by_equivalence, shared_verifier

    if equivalence == "exact":
        return cluster_by_equivalence(answers, None)
    if equivalence == "math_verify":
        return cluster_by_equivalence(answers, shared_verifier(timeout_s))
    raise ValueError(f"equivalence must be 'math_verify' or 'exact', got {equivalence!r}")


@reward("semantic_cluster", family="certainty")
def semantic_cluster(
    group: Group, ctx: RewardContext, *, equivalence: Equivalence = "math_verify",
    min_cluster_ratio: float = 0.0, no_answer: Literal["zero", "singleton"] = "zero", timeout_s: float = 5.0,
) -> RewardOutput:
    """EMPO: r(y) = |C(y)| / G, C(y) = the semantic cluster of ans(y)  (paper Table 2, Eq. 37).

    `min_cluster_ratio`: when the largest cluster holds less than this share of the group, every
    sample scores 0 (EMPO's confidence filter uses 0.25; 0 = off). `no_answer="zero"`: samples
    without an answer score 0 and join no cluster; `"singleton"`: each is its own cluster of
    size 1, scoring 1/G (what EMPO's code does with empty answers).
    """
    if not 0.0 <= min_cluster_ratio <= 1.0:
        raise ValueError(f"min_cluster_ratio must lie in [0, 1], got {min_cluster_ratio}")
    if no_answer not in ("zero", "singleton"):
        raise ValueError(f"no_answer must be 'zero' or 'singleton', got {no_answer!r}")
    voters = ctx.voters
    ids, failures = answer_clusters(voters, equivalence, timeout_s)
    sizes = Counter(i for i in ids if i is not None)
    total = len(voters)
    shares = [sizes[i] / total if i is not None else (1 / total if no_answer == "singleton" else 0.0)
              for i in ids[: group.size]]  # the trained samples are the first G voters
    largest = max(max(sizes.values(), default=0), 1 if no_answer == "singleton" else 0) / total
    if largest < min_cluster_ratio:
        shares = [0.0] * group.size
    return RewardOutput(scores=shares, diagnostics={
        "largest_cluster_ratio": [largest] * group.size,
        "clusters": [float(len(sizes))] * group.size,
        "equivalence_failures": [float(failures)] * group.size,
    })
