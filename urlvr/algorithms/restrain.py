"""RESTRAIN (Yu et al. 2025, arXiv 2510.02172, §3): self-penalising advantages from a group's whole
answer distribution, in place of the majority vote's.

For one prompt x with n voting samples and distinct extracted answers a_1..a_m (counts c_j, vote
shares f_j = c_j / n, majority count M(x) = max_j c_j):

- **pseudo-label weighting**: every a_j is a pseudo-label, weighted by w_j = g(f_j) / Σ_l g(f_l)
  with g(f) = exp(-(f - center)² / (2 sigma²)); the loss is Σ_j w_j L_GRPO(x, a_j), so sample i's
  advantage is Σ_j w_j A_ij, A_ij the estimator's advantage of i under reward r_ij = 1[ans_i = a_j];
- **negative rollout penalisation**: where M(x) < kappa·n the rewards are zeroed (so A_ij = 0) and
  every advantage is offset by -delta: the prompt only pushes its samples down;
- **prompt-level weighting**: the whole prompt's update scales by u_x = g(c_ref / n), c_ref the
  majority count of n samples drawn once, before training, from the frozen starting model.

The formulas are read from the paper through its ICLR 2026 paper note (the arXiv text and any code
were not readable from this project); the defaults of sigma, center, kappa and delta are ours, not
the paper's (docs/rewards.md, "RESTRAIN", says which choices are ours and why).

The paper's L_GRPO clips each pseudo-label's term on its own. Summing the w_j-weighted advantages
first is the same loss while the importance ratio stays inside the clip range (always, in an
on-policy recipe: one mini-batch, one epoch); beyond it, the clip acts on the sum.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from urlvr.algorithms.voting import majority_ratios

Estimate = Callable[[torch.Tensor], torch.Tensor]  # rewards [m, G] float64 -> advantages [m, G]


@dataclass(frozen=True)
class RestrainSettings:
    sigma: float  # g's bandwidth (> 0)
    center: float  # g's centre k in [0, 1]
    kappa: float  # low consensus: M(x) < kappa · n, as a share of the voting samples
    delta: float  # the advantage offset of a low-consensus prompt (>= 0)


@dataclass(frozen=True)
class RestrainGroup:
    advantages: tuple[float, ...]  # one per trained sample, float64 values
    penalized: bool  # M(x) < kappa · n: every advantage is -delta · u_x
    prompt_weight: float  # u_x (1.0 without prompt-level weighting)
    candidates: int  # m, the distinct answers among the voters


def shaping(share: float, settings: RestrainSettings) -> float:
    """g(f) = exp(-(f - center)² / (2 sigma²)) of a vote share f in [0, 1]."""
    return math.exp(_exponent(share, settings))


def _exponent(share: float, settings: RestrainSettings) -> float:
    """-(f - center)² / (2 sigma²), as -((f - center) / sigma)² / 2: sigma² underflows to 0 below
    sigma ~1e-162 (a division by zero), while the quotient only overflows to inf (g = 0), its limit."""
    z = (share - settings.center) / settings.sigma
    return -0.5 * z * z


def label_weights(shares: Sequence[float], settings: RestrainSettings) -> list[float]:
    """w_j = g(f_j) / Σ_l g(f_l) over the candidates' vote shares, as a softmax of the exponents:
    a small sigma underflows every g(f) to 0, and the ratio it stands for is still defined."""
    exponents = [_exponent(f, settings) for f in shares]
    if not exponents:  # no answer at all (with kappa 0, not penalised): no pseudo-label
        return []
    top = max(exponents)
    if top == -math.inf:  # a sigma so small that every exponent overflows: the ratio's limit, the
        # shares nearest the centre share the weight (e - top would be -inf - -inf = nan)
        nearest = min(abs(f - settings.center) for f in shares)
        exponents, top = [0.0 if abs(f - settings.center) == nearest else -math.inf for f in shares], 0.0
    scaled = [math.exp(e - top) for e in exponents]
    total = sum(scaled)
    return [s / total for s in scaled]


def restrain_group(voters: Sequence[str | None], answers: Sequence[str | None], estimate: Estimate,
                   settings: RestrainSettings, reference_share: float | None = None) -> RestrainGroup:
    """RESTRAIN's advantages of one group (arXiv 2510.02172, §3, the three parts above).

    `voters`: the n voting samples' answers (None = no answer), the trained ones first; `answers`:
    the G trained samples'; `estimate`: the recipe's advantage estimator, here on one row of rewards
    per pseudo-label `[m, G]` float64; `reference_share`: c_ref / n of the starting model (None: no
    prompt-level weighting, u_x = 1). Samples without an answer are never a pseudo-label (r_ij = 0
    for all j).
    """
    counts = Counter(a for a in voters if a is not None)
    n = len(voters)
    majority = max(counts.values(), default=0)
    weight = 1.0 if reference_share is None else shaping(reference_share, settings)
    size = len(answers)
    # low consensus: rewards zeroed, A - delta. M / n < kappa, not M < kappa · n: the product rounds
    # (0.28 · 25 = 7.000000000000001 penalised M = 7 = kappa · n); the quotient and kappa round alike
    if n and majority / n < settings.kappa:
        return RestrainGroup((-settings.delta * weight,) * size, True, weight, len(counts))
    if not counts:  # nobody answered (kappa 0: not penalised): no pseudo-label, no signal
        return RestrainGroup((0.0,) * size, False, weight, 0)
    labels = list(counts)
    weights = torch.tensor(label_weights([counts[a] / n for a in labels], settings), dtype=torch.float64)  # [m]
    rewards = torch.tensor([[float(a == label) for a in answers] for label in labels], dtype=torch.float64)  # [m, G]
    total = (weights[:, None] * estimate(rewards)).sum(dim=0)  # Σ_j w_j A_ij, one estimator call for every label
    return RestrainGroup(tuple((weight * total).tolist()), False, weight, len(counts))


def reference_share(answers: Sequence[str | None]) -> float:
    """c_ref / n: the majority's share among the starting model's n answers to a prompt (0 for
    none): p_maj, as the voting module counts it for every other use."""
    return float(majority_ratios([answers])[0])
