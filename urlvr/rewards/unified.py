"""The unified intrinsic reward (paper App. A.3, Eq. 26 and Table 6).

    r_uni(x, y) = psi( (sigma / |I|) * sum_{i in I} H(q_i, pi_i) ),   sigma in {+1, -1}

H(q, p) = -sum_v q(v) log p(v) is a cross-entropy between an anchor q and a model distribution p:

granularity="token": I = the response positions t, p = pi_t = pi(. | x, y_<t), and
    anchor="uniform"  q = U_V:        H(U_V, pi_t) - log|V| = KL(U_V || pi_t)   (see note)
    anchor="onehot"   q = delta_{y_t}: H = -log pi_t(y_t)
    anchor="self"     q = pi_t:        H = H(pi_t), the entropy
granularity="answer": I = {A}, q = delta_{ans(y)}, p = pi^A: the group's distribution over
    semantic answers -- the cluster share |C| / G over the voters (tau=None), its tempered form
    softmax(pi^A / tau) over the clusters (tau > 0), or that form's limit tau -> 0+ (tau=0: the mass
    split evenly over the largest clusters). With sigma = -1 and psi = exp this is
    exp(-H(delta_A, pi^A)) = pi^A(ans(y)); a sample with no answer scores 0. Only this
    instantiation (Table 6's two answer-level rows) is accepted: other answer-level anchors give
    every sample of a group the same reward, and psi = identity would give log 0 = -inf.
psi: transform="identity" (z) or "exp" (exp z). aggregate="sum" replaces the 1/|I| mean by the
sum, i.e. Table 6's psi(z) = exp(|I| z) for RLSC.

Special cases (Table 6; `tests/test_rewards_unified.py` checks each against the named reward):
    self_certainty       uniform, +1, identity, token
    token_entropy        self,    -1, identity, token
    trajectory_entropy   onehot,  -1, identity, token
    probability          onehot,  -1, exp,      token, aggregate=sum
    semantic_cluster     onehot,  -1, exp,      answer          (EMPO's semantic entropy reward)
    majority_vote        onehot,  -1, exp,      answer, tau=0   (TTRL; equal when the majority is unique)

Note on the uniform anchor: Table 6 writes r_SC = (1/|y|) sum_t H(U_V, pi_t) + log|V|, but
KL(U_V || pi_t) = H(U_V, pi_t) - log|V| (Table 1's definition); the constant does not depend on
the parameters and cancels in group-normalised advantages. The token statistic lent by the
trainer is the KL, so anchor="uniform" returns mean_t H(U_V, pi_t) - log|V|, which equals
`self_certainty` exactly.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Annotated, Literal

import torch
from pydantic import Field

from urlvr.rewards.base import RewardContext, RewardOutput, reward
from urlvr.rewards.certainty import masked_token_mean, masked_token_sum
from urlvr.rewards.ensemble import Equivalence, answer_clusters
from urlvr.rollout.base import Group

Anchor = Literal["uniform", "onehot", "self"]

_TOKEN_CROSS_ENTROPY = {  # anchor -> (token statistic, factor): H(q_t, pi_t) = factor * stat
    "uniform": ("self_certainty", 1.0),  # KL(U || pi_t) = H(U, pi_t) - log V
    "onehot": ("logprob", -1.0),  # -log pi_t(y_t)
    "self": ("entropy", 1.0),  # H(pi_t)
}


def _check(*, anchor: str = "onehot", sign: int = -1, transform: str = "identity", granularity: str = "token",
           aggregate: str = "mean", tau: float | None = None, **_: object) -> None:
    """Load-time validation of a combination of arguments (called by the recipe)."""
    if sign not in (1, -1):
        raise ValueError(f"unified: sign must be +1 or -1, got {sign!r}")
    if anchor not in _TOKEN_CROSS_ENTROPY:
        raise ValueError(f"unified: anchor must be one of {sorted(_TOKEN_CROSS_ENTROPY)}, got {anchor!r}")
    if transform not in ("identity", "exp"):
        raise ValueError(f"unified: transform must be 'identity' or 'exp', got {transform!r}")
    if aggregate not in ("mean", "sum"):
        raise ValueError(f"unified: aggregate must be 'mean' or 'sum', got {aggregate!r}")
    if granularity == "answer":
        if (anchor, sign, transform) != ("onehot", -1, "exp"):
            raise ValueError("unified: granularity='answer' takes anchor='onehot', sign=-1, transform='exp' "
                             f"(Table 6's answer-level rows), got anchor={anchor!r}, sign={sign}, transform={transform!r}")
        if tau is not None and tau < 0:
            raise ValueError(f"unified: tau must be >= 0 (or null = untempered), got {tau}")
    elif granularity != "token":
        raise ValueError(f"unified: granularity must be 'token' or 'answer', got {granularity!r}")


def _unified_stats(*, anchor: str = "onehot", granularity: str = "token", **_) -> tuple[str, ...]:
    """The one statistic Eq. 26 reads at token granularity (none at answer granularity)."""
    return () if granularity == "answer" or anchor not in _TOKEN_CROSS_ENTROPY else (_TOKEN_CROSS_ENTROPY[anchor][0],)


def _verifies(*, granularity: str = "token", equivalence: str = "exact", **_) -> bool:
    """Only answer clusters by math-verify can run out of time."""
    return granularity == "answer" and equivalence == "math_verify"


@reward("unified", family="certainty", stats=_unified_stats, timed=_verifies)
def unified(
    group: Group, ctx: RewardContext, *, anchor: Anchor = "onehot", sign: Literal[1, -1] = -1,
    transform: Literal["identity", "exp"] = "identity", granularity: Literal["token", "answer"] = "token",
    aggregate: Literal["mean", "sum"] = "mean", tau: Annotated[float | None, Field(ge=0.0, allow_inf_nan=False)] = None,
    equivalence: Equivalence = "exact", timeout_s: Annotated[float, Field(gt=0.0)] = 5.0,
) -> list[float] | RewardOutput:
    """r_uni(x, y) = psi((sigma/|I|) sum_{i in I} H(q_i, pi_i))  (paper App. A.3, Eq. 26, Table 6).

    `anchor`: q at token granularity, `uniform` (U_V), `onehot` (delta of the sampled token) or
    `self` (pi_t itself); answer granularity takes `onehot`.
    `sign`: sigma, +1 or -1.
    `transform`: psi, `identity` or `exp`.
    `granularity`: I, the response's `token` positions or its one `answer` (clusters of the voters).
    `aggregate`: `mean` over I (Eq. 26) or `sum` (Table 6's RLSC row).
    `tau`: answer granularity's temperature over the cluster shares (null: untempered; 0: the limit).
    `equivalence`: when two answers share a cluster, `exact` (equal strings) or `math_verify`.
    `timeout_s`: the limit of one math-verify comparison, in seconds. The module's docstring
    gives the whole table.
    """
    _check(anchor=anchor, sign=sign, transform=transform, granularity=granularity, aggregate=aggregate, tau=tau)
    if granularity == "answer":
        clustering = answer_clusters(ctx.voters, equivalence, timeout_s)  # out of time: "different", counted
        ids = clustering.ids
        p = answer_distribution(dict(Counter(i for i in ids if i is not None)), len(ctx.voters), tau)
        return RewardOutput([0.0 if cluster is None else p[cluster] for cluster in ids[: group.size]],  # exp(-H(delta_A, pi^A))
                            timeouts=clustering.cut_short)
    stat, factor = _TOKEN_CROSS_ENTROPY[anchor]
    if stat not in ctx.token_stats:
        raise KeyError(f"unified(anchor={anchor!r}) needs the token statistic {stat!r}")
    cross_entropy = factor * ctx.token_stats[stat].to(torch.float64)  # [G, T]: H(q_t, pi_t)
    pooled = masked_token_mean if aggregate == "mean" else masked_token_sum
    z = sign * pooled(cross_entropy, ctx.response_mask)  # [G]
    scores = z if transform == "identity" else torch.exp(z)
    return torch.where(ctx.response_mask.sum(-1) == 0, 0.0, scores).tolist()  # empty response: 0


unified.check = _check  # type: ignore[attr-defined]


def answer_distribution(cluster_sizes: dict[int, int], total: int, tau: float | None) -> dict[int, float]:
    """pi^A over clusters: |C| / total (tau=None), softmax(pi^A / tau) (tau > 0), or its tau -> 0+ limit (tau=0)."""
    shares = {c: n / total for c, n in cluster_sizes.items()}
    if tau is None or not shares:
        return shares
    top = max(shares.values())
    if tau == 0:  # the limit of the tempered softmax: uniform over the argmax set
        winners = [c for c, s in shares.items() if s == top]
        return {c: (1 / len(winners) if c in winners else 0.0) for c in shares}
    weights = {c: math.exp((s - top) / tau) for c, s in shares.items()}
    norm = sum(weights.values())
    return {c: w / norm for c, w in weights.items()}
