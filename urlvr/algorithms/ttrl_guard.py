"""TTRL-Guard (Lin et al. 2026, arXiv:2605.19444, §3.2-3.4 as its code cites them; code linhxkkkk/TTRL-Guard): flip-rate
reward scaling (FRS), minority-preserving sampling (MPS) and risk-conditioned sparse updating
(RCSU) on top of TTRL's majority vote, as pure per-step functions over a per-prompt history.

    A'_ij = A_ij · w_i · m_i + b_i(ans_ij) · (mean_j |A_ij · w_i · m_i| + 1e-6)

w_i the FRS weight, m_i ∈ {0, 1} the RCSU keep flag, b_i the MPS bonus of the sample's answer.
Every term reads the prompt's history across steps: its flip rate FR_t = 1[maj_t ≠ maj_{t-1}]
compares the majority answer with the one of the prompt's previous visit (the paper's test-time
setting revisits every prompt every step). So the caller keeps one `PromptHistory` per prompt id
from step to step -- plain frozen data, saved with every checkpoint -- and calls `guard_step`
after the advantage estimator: the trainer does, through `algorithm.advantage_shaping:
ttrl_guard` (algorithms/advantage_shaping.py, trainer/loop.py `with_advantages`).

The formulas follow the public code's `TTRLGuard.step` / `compute_guard_advantage` /
`apply_mps_bonus_to_advantage` (the paper's equations could not be read from this session). Our
departures, each stated where it acts: the MPS scale is the mean |A| over the prompt's samples
(the code averages a padded token-level tensor, so its scale shrinks with padding); the MPS vote
counts are the voters' answer counts (the code reads a `vote_counts` field that nothing in its
repository writes, so as shipped its bonus is never paid).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class GuardSettings:
    """TTRL-Guard's knobs, with the public code's defaults (its shipped scripts switch FRS off)."""

    tau_fr: float = 0.3  # flip rate above which a prompt counts as flipping
    tau_mr: float = 0.6  # majority ratio above which FRS's contradiction / steady-state terms fire
    lambda1: float = 0.5  # FRS: w = 1 - lambda1 · FR
    lambda2: float = 0.3  # FRS: extra factor (1 - lambda2) when MR > tau_mr and FR > tau_fr
    beta_max: float = 0.3  # MPS: largest bonus, reached when FR >= tau_fr
    mps_min_votes_denom: int = 4  # MPS: a minority answer needs >= G // this votes (G trained samples)
    mps_steady: int = 3  # MPS stays on until this many consecutive steps without a flip
    window: int = 5  # W: visits needed before RCSU / FRS's steady-state term, and the MR window
    theta_mr: float = 0.7  # RCSU: windowed MR above this (after a flip) = high risk
    p_skip: float = 0.7  # RCSU: probability a high-risk prompt's update is skipped
    max_skip_fraction: float = 0.25  # RCSU: at most max(1, floor(B · this)) prompts skipped per step
    frs: bool = True
    mps: bool = True
    rcsu: bool = True

    def __post_init__(self) -> None:
        for name, value in vars(self).items():  # a str, a bool for a count or 2.5 visits would fail later, mid-step
            wanted = bool if name in ("frs", "mps", "rcsu") else int if name in ("mps_min_votes_denom", "mps_steady", "window") else float
            fits = isinstance(value, wanted) and (wanted is bool or not isinstance(value, bool))
            if not fits and not (wanted is float and isinstance(value, int) and not isinstance(value, bool)):
                raise ValueError(f"TTRL-Guard: {name} must be a {wanted.__name__}, got {value!r}")
        for name in ("tau_fr", "tau_mr", "lambda1", "lambda2", "beta_max", "theta_mr", "p_skip", "max_skip_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TTRL-Guard: {name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("mps_min_votes_denom", "mps_steady", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"TTRL-Guard: {name} must be >= 1, got {getattr(self, name)}")

    @property
    def history_cap(self) -> int:
        """Visits kept per prompt (the code's deque length)."""
        return max(3 * self.window, 20)


@dataclass(frozen=True)
class PromptHistory:
    """One prompt's state across steps (checkpointable plain data)."""

    majorities: tuple[str | None, ...] = ()  # majority answer per visit, oldest first (None: nobody answered)
    ratios: tuple[float, ...] = ()  # majority ratio per visit
    had_flip: bool = False  # FR > tau_fr seen on some visit ("had competition")
    mps_active: bool = False
    mps_calm_steps: int = 0  # consecutive visits without a flip while MPS is active
    stable_wrong_fired: int = 0  # times FRS's steady-state term fired (capped at W)


@dataclass(frozen=True)
class GuardStep:
    advantages: torch.Tensor  # [B, G] float64
    histories: dict[str, PromptHistory]
    flip_rates: list[float] = field(default_factory=list)  # [B]
    weights: list[float] = field(default_factory=list)  # [B] FRS weights (1 when off)
    kept: list[bool] = field(default_factory=list)  # [B] False = RCSU skipped the prompt's update
    bonus: list[dict[str, float]] = field(default_factory=list)  # [B] MPS bonus per minority answer


def majority_and_ratio(voters: Sequence[str | None]) -> tuple[str | None, float]:
    """TTRL's vote: (most frequent answer, its count / |voters|), first seen on a tie; (None, 0.0)
    when nobody answered. Answerless voters count in the denominator."""
    counts = Counter(a for a in voters if a is not None)
    if not counts:
        return None, 0.0
    answer, count = counts.most_common(1)[0]
    return answer, count / len(voters)


def windowed_ratio(history: PromptHistory, settings: GuardSettings) -> float:
    """Mean majority ratio over the last W visits (0.5 before any visit)."""
    recent = history.ratios[-settings.window:]
    return sum(recent) / len(recent) if recent else 0.5


def observe(history: PromptHistory, majority: str | None, ratio: float,
            settings: GuardSettings) -> tuple[PromptHistory, float]:
    """Append this visit; return (history, FR) with FR = 1[maj_t ≠ maj_{t-1}] (0 on a first visit)."""
    cap = settings.history_cap
    majorities = (history.majorities + (majority,))[-cap:]
    ratios = (history.ratios + (float(ratio),))[-cap:]
    flip = 1.0 if len(majorities) >= 2 and majorities[-1] != majorities[-2] else 0.0
    return replace(history, majorities=majorities, ratios=ratios,
                   had_flip=history.had_flip or flip > settings.tau_fr), flip


def frs_weight(history: PromptHistory, flip: float, ratio: float, settings: GuardSettings) -> tuple[float, bool]:
    """w = max(0.1, (1 - λ1·FR) · (1 - λ2)^[MR > τ_MR ∧ FR > τ_FR] · (1 - λ2/2)^S) and S, where S = 1
    when the prompt never flipped, has >= W visits, a windowed MR > τ_MR, and S fired < W times."""
    weight = 1.0 - settings.lambda1 * flip
    if ratio > settings.tau_mr and flip > settings.tau_fr:
        weight *= 1.0 - settings.lambda2
    steady = (not history.had_flip and len(history.majorities) >= settings.window
              and windowed_ratio(history, settings) > settings.tau_mr and history.stable_wrong_fired < settings.window)
    if steady:
        weight *= 1.0 - settings.lambda2 * 0.5
    return max(0.1, weight), steady


def high_risk(history: PromptHistory, settings: GuardSettings) -> bool:
    """RCSU: the prompt once flipped, has >= W visits, and its windowed MR exceeds θ_MR."""
    return history.had_flip and len(history.majorities) >= settings.window and \
        windowed_ratio(history, settings) > settings.theta_mr


def mps_update(history: PromptHistory, flip: float, settings: GuardSettings) -> PromptHistory:
    """MPS switches on at a flip and off after `mps_steady` consecutive visits without one."""
    if flip > settings.tau_fr:
        return replace(history, mps_active=True, mps_calm_steps=0)
    if history.mps_active:
        calm = history.mps_calm_steps + 1
        return replace(history, mps_calm_steps=calm, mps_active=calm < settings.mps_steady)
    return history


def mps_bonus(history: PromptHistory, flip: float, votes: Mapping[str, int], majority: str | None,
              group_size: int, settings: GuardSettings) -> dict[str, float]:
    """b(a) = β_t · c_a / Σ_minority c, β_t = β_max · min(FR / τ_FR, 1), for the answers a ≠ maj
    with c_a >= max(1, G // mps_min_votes_denom) votes, while MPS is active; else {}."""
    if not history.mps_active:
        return {}
    least = max(1, group_size // settings.mps_min_votes_denom)
    minority = {a: c for a, c in votes.items() if c >= least and a != majority}
    beta = settings.beta_max * min(flip / max(settings.tau_fr, 1e-6), 1.0)
    if not minority or beta <= 0.0:
        return {}
    total = sum(minority.values())
    return {a: beta * c / total for a, c in minority.items()}


def guard_step(histories: Mapping[str, PromptHistory], prompt_ids: Sequence[str],
               voters: Sequence[Sequence[str | None]], answers: Sequence[Sequence[str | None]],
               advantages: torch.Tensor, rng: random.Random, settings: GuardSettings = GuardSettings()) -> GuardStep:
    """One step of TTRL-Guard over a batch of B groups: `advantages` [B, G] from the estimator,
    `answers[i]` the G trained samples' answers, `voters[i]` all voting answers of prompt i,
    `histories` by prompt id (absent = first visit). Returns the guarded advantages (float64) and
    the updated histories. `rng` draws RCSU's skips, one draw per high-risk prompt in batch order."""
    if advantages.ndim != 2 or advantages.shape[0] != len(prompt_ids):
        raise ValueError(f"advantages must be [B, G] with B = {len(prompt_ids)} prompts, got {tuple(advantages.shape)}")
    if len(set(prompt_ids)) != len(prompt_ids):
        raise ValueError("TTRL-Guard: a prompt appears twice in one step; its flip rate would compare the step with itself")
    if len(voters) != len(prompt_ids) or len(answers) != len(prompt_ids):
        raise ValueError("TTRL-Guard: one voter list and one answer list per prompt")
    group_size = advantages.shape[1]
    new: dict[str, PromptHistory] = dict(histories)
    flips, weights, kept, bonuses = [], [], [], []
    observed = []
    for pid, votes in zip(prompt_ids, voters):
        majority, ratio = majority_and_ratio(votes)
        history, flip = observe(new.get(pid, PromptHistory()), majority, ratio, settings)
        observed.append((majority, ratio))
        flips.append(flip)
        new[pid] = history
    for pid, flip, (_, ratio) in zip(prompt_ids, flips, observed):
        weight = 1.0
        if settings.frs:
            weight, steady = frs_weight(new[pid], flip, ratio, settings)
            if steady:
                new[pid] = replace(new[pid], stable_wrong_fired=new[pid].stable_wrong_fired + 1)
        weights.append(weight)
    cap, skipped = max(1, int(len(prompt_ids) * settings.max_skip_fraction)), 0
    for pid in prompt_ids:
        keep = True
        if settings.rcsu and high_risk(new[pid], settings):
            if rng.random() < settings.p_skip and skipped < cap:  # the draw is spent even past the cap
                keep, skipped = False, skipped + 1
        kept.append(keep)
    for pid, flip, votes, (majority, _) in zip(prompt_ids, flips, voters, observed):
        bonus = {}
        if settings.mps:
            new[pid] = mps_update(new[pid], flip, settings)
            bonus = mps_bonus(new[pid], flip, Counter(a for a in votes if a is not None), majority, group_size, settings)
        bonuses.append(bonus)

    scale = torch.tensor(weights, dtype=torch.float64) * torch.tensor(kept, dtype=torch.float64)  # [B]
    guarded = advantages.to(torch.float64) * scale[:, None]  # [B, G]
    out = guarded.clone()
    for i, bonus in enumerate(bonuses):
        if not bonus:
            continue
        size = guarded[i].abs().mean().item() + 1e-6  # the prompt's advantage scale
        mean_bonus = sum(bonus.values()) / len(bonus)
        for j, answer in enumerate(answers[i]):
            if answer is None:  # no answer: a small share keeps exploring
                out[i, j] += mean_bonus * size * 0.05
            elif answer in bonus:
                out[i, j] += bonus[answer] * size
    return GuardStep(out, new, flips, weights, kept, bonuses)
