"""Semantic-cluster reward (EMPO; paper Table 2 and App. A.5, Eq. 37).

r(y) = |C(y)| / G: the share of the group whose answer is equivalent to y's. Equivalence is
math-verify's (`\\frac{1}{2}`, `0.5` and `1/2` form one cluster) or exact string equality of the
normalised answers. Clusters are built greedily against each cluster's first member, as in
EMPO's code. When the recipe draws extra voting samples, clusters and G run over all voters.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

from pydantic import Field

from urlvr.rewards.base import RewardContext, RewardOutput, reward
from urlvr.rewards.math_verify import (
    DEFAULT_BUDGET_S,
    DEFAULT_TIMEOUT_S,
    DEFAULT_WORKERS,
    Clustering,
    VerificationBudget,
    check_verification_kwargs,
    cluster_by_equivalence,
    shared_verifier,
)
from urlvr.rollout.base import Group

Equivalence = Literal["math_verify", "exact"]


def equivalence_budget(equivalence: Equivalence = "exact", timeout_s: float = DEFAULT_TIMEOUT_S,
                       budget_s: float = DEFAULT_BUDGET_S, workers: int = DEFAULT_WORKERS) -> VerificationBudget:
    """A fresh verification budget for `equivalence` (exact string equality needs none)."""
    if equivalence == "exact":
        return VerificationBudget(None, budget_s)
    if equivalence == "math_verify":
        return VerificationBudget(shared_verifier(timeout_s, workers=workers), budget_s)
    raise ValueError(f"equivalence must be 'math_verify' or 'exact', got {equivalence!r}")


def answer_clusters(
    answers: Sequence[str | None], equivalence: Equivalence = "exact", timeout_s: float = DEFAULT_TIMEOUT_S,
    budget_s: float = DEFAULT_BUDGET_S, workers: int = DEFAULT_WORKERS,
) -> Clustering:
    """Cluster ids per answer (None for no answer), with counts of failed / cut-short comparisons."""
    return cluster_by_equivalence(answers, equivalence_budget(equivalence, timeout_s, budget_s, workers))


def _cluster_step(
    groups: Sequence[Group], contexts: Sequence[RewardContext], policy: object, *,
    equivalence: Equivalence = "math_verify", timeout_s: float = DEFAULT_TIMEOUT_S,
    budget_s: float = DEFAULT_BUDGET_S, workers: int = DEFAULT_WORKERS,
) -> list[Clustering | None]:
    """Batch phase: cluster every group of the step under one budget, groups in parallel."""
    if equivalence == "exact":
        return [None] * len(groups)  # nothing to budget: each group clusters itself
    budget = equivalence_budget(equivalence, timeout_s, budget_s, workers)
    with ThreadPoolExecutor(max_workers=max(1, min(len(contexts), workers))) as pool:
        return list(pool.map(lambda ctx: cluster_by_equivalence(ctx.voters, budget), contexts))


def _verifies(*, equivalence: Equivalence = "math_verify", **_: object) -> bool:
    """Only math-verify comparisons can run out of time (exact equality cannot)."""
    return equivalence == "math_verify"


@reward("semantic_cluster", prepare=_cluster_step, family="certainty", timed=_verifies)
def semantic_cluster(
    group: Group, ctx: RewardContext, *, equivalence: Equivalence = "math_verify",
    min_cluster_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0, no_answer: Literal["zero", "singleton"] = "zero",
    timeout_s: float = DEFAULT_TIMEOUT_S, budget_s: float = DEFAULT_BUDGET_S, workers: int = DEFAULT_WORKERS,
) -> RewardOutput:
    """EMPO: r(y) = |C(y)| / G, C(y) = the semantic cluster of ans(y)  (paper Table 2, Eq. 37).

    `equivalence`: when two answers share a cluster, `math_verify` (mathematically equivalent)
    or `exact` (equal strings).
    `min_cluster_ratio`: when the largest cluster holds less than this share of the group, every
    sample scores 0 (EMPO's confidence filter uses 0.25; 0 = off).
    `no_answer`: `zero` (samples without an answer score 0 and join no cluster) or `singleton`
    (each is its own cluster of size 1, scoring 1/G: what EMPO's code does with empty answers).
    `timeout_s`: the limit of one math-verify comparison, in seconds.
    `budget_s`: the limit of all of a step's comparisons (of this group, outside a step), in seconds.
    `workers`: the child processes that run the comparisons. A comparison without a verdict
    counts as "different" (one that ran out of time too: it is counted in `timeouts`).
    """
    if not 0.0 <= min_cluster_ratio <= 1.0:
        raise ValueError(f"min_cluster_ratio must lie in [0, 1], got {min_cluster_ratio}")
    if no_answer not in ("zero", "singleton"):
        raise ValueError(f"no_answer must be 'zero' or 'singleton', got {no_answer!r}")
    voters = ctx.voters
    clustering = ctx.prepared
    if clustering is None:
        clustering = answer_clusters(voters, equivalence, timeout_s, budget_s, workers)
    ids = clustering.ids
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
        "equivalence_failures": [float(clustering.failures)] * group.size,
        "cut_short": [float(clustering.cut_short)] * group.size,
    }, timeouts=clustering.cut_short)


semantic_cluster.check = check_verification_kwargs  # type: ignore[attr-defined]
