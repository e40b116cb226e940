"""Group filters of dynamic sampling (DAPO, Yu et al. 2025, arXiv:2503.14476, Sec. 3.2, Eq. 11):
which sampled groups are informative enough to train on (`rollout.dynamic_sampling`).

    rollout:
      dynamic_sampling: {name: zero_variance, max_rounds: 3}      # or agreement; `none` (default) = off

A group whose rewards are all equal gets zero advantage under every estimator, so it adds no
gradient, only tokens to the normaliser: DAPO keeps sampling prompts until the batch holds
`prompts_per_step` groups with 0 < acc < G ("s.t. 0 < |{o_i | is_equivalent(a, o_i)}| < G").
Under majority voting that happens whenever p_maj = 1, common late in a URLVR run. `agreement`
also drops groups whose proxy agreement (p_maj, the majority answer's share of the voters) is
above a threshold. The refill rounds themselves live in `trainer/dynamic_sampling.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator

from urlvr.algorithms.advantages import constant_groups
from urlvr.algorithms.voting import majority_ratios
from urlvr.registry import Registry
from urlvr.section import VariantSection, check_variant_name


class GroupFilter(VariantSection):
    """Base of a group filter: `keep(rewards, voters)` says which groups train, `fill_priority`
    which filtered groups fill a step first when the rounds run out (lower first)."""

    max_rounds: int = Field(3, ge=1, le=64)
    """Generation rounds per step at most, the first included; each round draws one more global
    batch of `prompts_per_round` prompts. When the cap is hit before the step has its
    informative groups, the rest is filled with filtered groups (fill_priority order). 1 only
    with rounds larger than the training batch (`prompts_per_round`): one round of the training
    batch's size never refills, so every drawn group would train, as with `none`."""
    prompts_per_round: int | None = Field(None, ge=1)
    """Prompts drawn (and groups generated) per round, over all ranks: the generation batch, as
    against the training batch of `trainer.prompts_per_step` groups (verl's `data.gen_batch_size`;
    verl's DAPO recipes generate 3x the training batch). null = `trainer.prompts_per_step`.
    Larger rounds need fewer of them when many groups are flat; groups past the step's quota are
    dropped, informative or not, never carried to the next step (as in verl). At least the number
    of ranks (each rank generates whole groups), and `max_rounds * prompts_per_round >
    trainer.prompts_per_step` (fewer could not fill a step; exactly as many would train every drawn
    group, as `none` does)."""

    @model_validator(mode="after")
    def _a_refill_round(self) -> GroupFilter:
        if self.max_rounds < 2 and self.prompts_per_round is None:
            raise ValueError("max_rounds 1 never refills: every drawn group trains, as with dynamic_sampling none "
                             "(use 2 or more, or rounds larger than the training batch: prompts_per_round)")
        return self

    def round_size(self, prompts_per_step: int) -> int:
        """Prompts per round: `prompts_per_round`, or the training batch when unset."""
        return prompts_per_step if self.prompts_per_round is None else self.prompts_per_round

    def keep(self, rewards: torch.Tensor, voters: Sequence[Sequence[str | None]]) -> torch.Tensor:
        """`[B, G] rewards, B voter answer lists -> [B] bool`: True = informative, trains."""
        raise NotImplementedError

    def fill_priority(self, rewards: torch.Tensor, voters: Sequence[Sequence[str | None]]) -> torch.Tensor:
        """`[B] float64`: which filtered groups fill a short step first (lower first; ties: drawn first)."""
        return torch.zeros(rewards.shape[0], dtype=torch.float64)


GROUP_FILTERS: Registry[type[VariantSection]] = Registry("group filter", check=check_variant_name)


# --------------------------------------------------------------------------- pure functions
def zero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """1[r_i1 = r_i2 = ... = r_iG]: every sample of the group got the same reward. `[B, G] -> [B] bool`.

    Equal to within float rounding (`constant_groups`), the rule under which the advantage
    estimators give exactly 0; a group of one always has zero variance (no baseline, no
    relative signal). DAPO's 0 < acc < G, for any reward.
    """
    return constant_groups(rewards)


def agreement(voters: Sequence[Sequence[str | None]]) -> torch.Tensor:
    """p_maj per group: the majority answer's share of the voters (samples without an answer count
    in the denominator; 0 when nobody answered), as logged in `dynamics/majority_ratio`. `-> [B]`"""
    return majority_ratios(voters)


def select_groups(keep: torch.Tensor, priority: torch.Tensor, quota: int) -> tuple[list[int], int]:
    """(indices of the groups that train, how many of them were filtered groups filling a short step).

    The first `quota` informative groups in draw order (round, then position in the global batch);
    if fewer were drawn, the filtered groups with the lowest `priority` (then drawn first) fill the
    step. Returned in draw order. The same on every rank and for any number of ranks: it reads
    the global flags only. `keep [N] bool, priority [N] -> (list of quota indices, filled)`.
    """
    if quota > keep.numel():
        raise ValueError(f"cannot select {quota} groups out of {keep.numel()}")
    informative = torch.nonzero(keep).flatten().tolist()[:quota]
    filtered = torch.nonzero(~keep).flatten().tolist()
    filler = sorted(filtered, key=lambda i: (float(priority[i]), i))[:quota - len(informative)]
    return sorted(informative + filler), len(filler)


# --------------------------------------------------------------------------- variants
@GROUP_FILTERS.register("none")
class NoFilter(VariantSection):
    """Dynamic sampling off: every drawn group trains (Table 7)."""

    name: Literal["none"] = "none"


@GROUP_FILTERS.register("zero_variance")
class ZeroVarianceFilter(GroupFilter):
    """DAPO's dynamic sampling: drop groups whose rewards are all equal (zero advantage, no gradient)."""

    name: Literal["zero_variance"] = "zero_variance"

    def keep(self, rewards: torch.Tensor, voters: Sequence[Sequence[str | None]]) -> torch.Tensor:
        return ~zero_variance_groups(rewards)


@GROUP_FILTERS.register("agreement")
class AgreementFilter(GroupFilter):
    """Drop groups whose rewards are all equal or whose proxy agreement p_maj exceeds `max_agreement`."""

    name: Literal["agreement"] = "agreement"
    max_agreement: float = Field(0.875, gt=0.0, le=1.0)
    """Largest p_maj (share of voters giving the majority answer) a training group may have.
    0.875 = 7 of 8 voters; 1.0 drops only zero-variance groups (then equal to `zero_variance`)."""

    def keep(self, rewards: torch.Tensor, voters: Sequence[Sequence[str | None]]) -> torch.Tensor:
        return ~zero_variance_groups(rewards) & (agreement(voters) <= self.max_agreement)

    def fill_priority(self, rewards: torch.Tensor, voters: Sequence[Sequence[str | None]]) -> torch.Tensor:
        """Groups with a reward spread (some gradient) before zero-variance ones, each by p_maj."""
        return zero_variance_groups(rewards).double() * 2.0 + agreement(voters)
