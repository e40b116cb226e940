"""Advantage shaping (`algorithm.advantage_shaping`): what acts on the global batch's advantages
after the estimator, with state carried across steps per prompt (saved with every checkpoint).

A shaper sees the whole global batch, the same on every rank: the prompt ids, each group's
voting answers and trained samples' answers, and the estimator's advantages `[B, G]` (float64).
It returns the shaped advantages, its new per-prompt state and metrics. Its random draws come
from a generator seeded by (recipe seed, step), so a resumed run draws what the uninterrupted
one did; `estimate` is the recipe's estimator (`algorithm.advantage`, its eps bound) on rewards
`[num_groups, G]` float64. Variants: `none` (the default: nothing changes), `ttrl_guard`
(TTRL-Guard, arXiv 2605.19444; algorithms/ttrl_guard.py) and `restrain` (RESTRAIN, arXiv
2510.02172; algorithms/restrain.py).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from urlvr.algorithms.restrain import Estimate, RestrainSettings, restrain_group
from urlvr.algorithms.ttrl_guard import GuardSettings, PromptHistory, guard_step
from urlvr.registry import Registry
from urlvr.section import VariantSection, check_variant_name

ADVANTAGE_SHAPERS: Registry[type[VariantSection]] = Registry("advantage shaper", check=check_variant_name)

State = dict[str, Any]  # per-prompt state by prompt id, JSON-able (it goes into trainer_state.json)


@ADVANTAGE_SHAPERS.register("none")
class NoShaping(VariantSection):
    """Advantages as the estimator gives them (Table 7)."""

    name: Literal["none"] = "none"


@ADVANTAGE_SHAPERS.register("ttrl_guard")
class TTRLGuardShaping(VariantSection):
    """TTRL-Guard (Lin et al. 2026, arXiv 2605.19444, §3.2-3.4): A' = A·w·m + b(ans)·(mean|A·w·m| + 1e-6)
    per prompt, from its majority's flips across visits (docs/rewards.md, "TTRL-Guard"). Defaults
    are the public code's. Meant for test-time training, where every prompt is revisited; a run
    that visits no prompt twice is refused (every part would be inert)."""

    name: Literal["ttrl_guard"] = "ttrl_guard"
    needs_revisits: ClassVar[bool] = True  # every part reads a prompt's earlier visits
    tau_fr: float = Field(0.3, ge=0.0, le=1.0)
    """Flip rate above which a prompt counts as flipping."""
    tau_mr: float = Field(0.6, ge=0.0, le=1.0)
    """Majority ratio above which FRS's contradiction and steady-state terms fire."""
    lambda1: float = Field(0.5, ge=0.0, le=1.0)
    """FRS: w = 1 - lambda1 · FR."""
    lambda2: float = Field(0.3, ge=0.0, le=1.0)
    """FRS: the extra factor (1 - lambda2) when MR > tau_mr and FR > tau_fr."""
    beta_max: float = Field(0.3, ge=0.0, le=1.0)
    """MPS: the largest minority bonus, paid when FR >= tau_fr."""
    mps_min_votes_denom: int = Field(4, ge=1)
    """MPS: a minority answer needs at least max(1, G // this) votes."""
    mps_steady: int = Field(3, ge=1)
    """MPS stays on until this many consecutive visits without a flip."""
    window: int = Field(5, ge=1)
    """W: visits needed before RCSU and FRS's steady-state term, and the window of the mean MR."""
    theta_mr: float = Field(0.7, ge=0.0, le=1.0)
    """RCSU: a windowed MR above this (after a flip) marks a prompt high-risk."""
    p_skip: float = Field(0.7, ge=0.0, le=1.0)
    """RCSU: probability that a high-risk prompt's update is skipped."""
    max_skip_fraction: float = Field(0.25, ge=0.0, le=1.0)
    """RCSU: at most max(1, floor(B · this)) prompts skipped per step."""
    frs: bool = True
    """Flip-rate reward scaling on (the authors' own scripts switch it off)."""
    mps: bool = True
    """Minority-preserving bonus on."""
    rcsu: bool = True
    """Risk-conditioned sparse updating on."""

    def shape(self, state: State, prompt_ids: Sequence[str], voters: Sequence[Sequence[str | None]],
              answers: Sequence[Sequence[str | None]], advantages: torch.Tensor,
              rng: random.Random, *, estimate: Estimate) -> tuple[torch.Tensor, State, dict[str, float]]:
        """(advantages `[B, G]` float64, the new state, `ttrl_guard/*` metrics) of one step."""
        settings = GuardSettings(**self.model_dump(exclude={"name"}))
        histories = {pid: _history(saved) for pid, saved in state.items()}
        step = guard_step(histories, prompt_ids, voters, answers, advantages, rng, settings)
        count = max(len(prompt_ids), 1)
        metrics = {"ttrl_guard/flip_rate_mean": sum(step.flip_rates) / count,
                   "ttrl_guard/frs_weight_mean": sum(step.weights) / count,
                   "ttrl_guard/skipped_fraction": sum(not kept for kept in step.kept) / count,
                   "ttrl_guard/bonus_prompt_fraction": sum(bool(bonus) for bonus in step.bonus) / count}
        return step.advantages, {pid: asdict(history) for pid, history in step.histories.items()}, metrics


@ADVANTAGE_SHAPERS.register("restrain")
class RestrainShaping(VariantSection):
    """RESTRAIN (Yu et al. 2025, arXiv 2510.02172, §3): A_i = u_x · Σ_j w_j A_ij, or -delta · u_x where
    M(x) < kappa·n, w_j = g(f_j) / Σ_l g(f_l), g(f) = exp(-(f - center)² / (2 sigma²)), u_x = g(c_ref/n)
    (docs/rewards.md, "RESTRAIN"). Replaces the estimator's advantages from the group's answers:
    the reward (majority_vote) is then only logged. The paper's defaults were not readable: these are ours."""

    name: Literal["restrain"] = "restrain"
    sigma: float = Field(0.3, gt=0.0)
    """g's bandwidth: small tends to the majority vote alone, large to every answer alike (ours: 0.3)."""
    center: float = Field(1.0, ge=0.0, le=1.0)
    """g's centre k: 1 makes g rise with the vote share, as the paper's "monotonic" g (ours: 1.0)."""
    kappa: float = Field(0.3, ge=0.0, le=1.0)
    """Low consensus: majority count M(x) < kappa · voting samples; the paper's count threshold kappa,
    here a share so that it carries over between group sizes (ours: 0.3; 0 switches the penalty off)."""
    delta: float = Field(0.5, ge=0.0, allow_inf_nan=False)
    """The negative offset of every advantage of a low-consensus prompt (ours: 0.5; finite: .inf would
    make the whole loss NaN)."""
    prompt_weighting: bool = True
    """u_x from the starting model: before step 1, the engine draws the voting samples once for every
    training prompt (one extra generation pass over the data, with a progress line)."""

    def settings(self) -> RestrainSettings:
        return RestrainSettings(**self.model_dump(exclude={"name", "prompt_weighting"}))

    def check_recipe(self, recipe) -> None:
        """Load time (the recipe's `_advantage_shaping_fits_the_recipe`): ValueError for what RESTRAIN
        would leave inert. It replaces the vote's advantages, so any other reward term, and the vote
        term's own weight, gate or kwargs, would only change the logged reward; dynamic sampling would
        drop the low-consensus groups it penalises."""
        names = [term.name for term in recipe.reward.terms]
        if names != ["majority_vote"]:
            raise ValueError(f"algorithm.advantage_shaping restrain makes every advantage from the group's answers, in "
                             f"place of the reward's: reward.terms {names} would only be logged; use majority_vote alone")
        idle = [f"reward.terms.0.{knob}" for knob in recipe.reward.terms[0].changed("weight", "gate", "kwargs")]
        if idle:  # they shape the vote's reward only (ties, min_majority_ratio, ...): RESTRAIN never reads it
            raise ValueError(f"algorithm.advantage_shaping restrain makes every advantage from the group's answers, in "
                             f"place of the vote's reward: {' and '.join(idle)} would shape only the logged reward; "
                             "drop them (RESTRAIN's own knobs are under algorithm.advantage_shaping)")
        if recipe.rollout.dynamic_sampling.name != "none":
            raise ValueError("algorithm.advantage_shaping restrain penalises low-consensus groups, which the majority "
                             "vote often scores all alike, and rollout.dynamic_sampling drops such groups first: drop "
                             "one of them")

    @property
    def wants_reference_answers(self) -> bool:
        """u_x needs the starting model's answers to every training prompt, drawn before step 1."""
        return self.prompt_weighting

    def shape(self, state: State, prompt_ids: Sequence[str], voters: Sequence[Sequence[str | None]],
              answers: Sequence[Sequence[str | None]], advantages: torch.Tensor,
              rng: random.Random, *, estimate: Estimate) -> tuple[torch.Tensor, State, dict[str, float]]:
        """(advantages `[B, G]` float64, the state unchanged, `restrain/*` metrics) of one step. The
        state holds each prompt's `reference_share` (c_ref / n), drawn before step 1."""
        settings = self.settings()
        groups = []
        for pid, votes, trained in zip(prompt_ids, voters, answers):
            if self.prompt_weighting and pid not in state:  # drawn before step 1 for every training prompt
                raise RuntimeError(f"restrain: no starting-model answers were drawn for prompt {pid!r}")
            share = state[pid]["reference_share"] if self.prompt_weighting else None
            groups.append(restrain_group(votes, trained, estimate, settings, share))
        shaped = torch.tensor([g.advantages for g in groups], dtype=torch.float64).view_as(advantages)
        count = max(len(groups), 1)
        metrics = {"restrain/penalized_fraction": sum(g.penalized for g in groups) / count,
                   "restrain/prompt_weight_mean": sum(g.prompt_weight for g in groups) / count,
                   "restrain/candidates_mean": sum(g.candidates for g in groups) / count}
        return shaped, state, metrics


def _history(saved: dict[str, Any]) -> PromptHistory:
    """A `PromptHistory` from its JSON form (tuples come back as lists)."""
    return PromptHistory(**{key: tuple(value) if isinstance(value, list) else value for key, value in saved.items()})
