"""How well a reward agrees with correctness on one batch of groups, as pure functions (`urlvr probe`).

Inputs are per-sample tensors `[B, G]`: a reward's scores and 0/1 correctness (NaN rows for
prompts without a label are dropped by the caller). The paper's Theorem 1 says that training on
an intrinsic reward concentrates each prompt's policy on the answer the reward ranks first (the
initial majority, for voting); whether that helps depends on how often that answer is right --
the confidence-correctness alignment these functions measure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch


def auroc(scores: torch.Tensor, correct: torch.Tensor) -> float | None:
    """P(score of a random correct sample > score of a random wrong one), ties count 1/2
    (Mann-Whitney U / (n1 n0)). Pooled over every sample; None without both classes. [N] x2 -> float."""
    scores, correct = scores.double().flatten(), correct.flatten() > 0.5
    n1, n0 = int(correct.sum()), int((~correct).sum())
    if n1 == 0 or n0 == 0:
        return None
    ranks = _average_ranks(scores)
    u = float(ranks[correct].sum()) - n1 * (n1 + 1) / 2
    return u / (n1 * n0)


def group_auroc(scores: torch.Tensor, correct: torch.Tensor) -> float | None:
    """Mean of the within-group AUROC over the groups that hold both correct and wrong samples:
    the ranking GRPO uses (advantages compare siblings, not prompts). [B, G] x2 -> float."""
    values = [auroc(s, c) for s, c in zip(scores, correct)]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def is_binary(scores: torch.Tensor) -> bool:
    """Whether every score is 0 or 1 (Reward Accuracy, Eq. 40, is defined for such rewards only)."""
    return bool(((scores == 0) | (scores == 1)).all())


def advantage_correctness(advantages: torch.Tensor, correct: torch.Tensor) -> float:
    """mean_ij A_ij c_ij: the first-order direction of the expected correctness under a policy
    gradient step with these advantages (it raises log pi(y_ij) by A_ij). For GRPO's
    A = (r - mean) / std this is mean_i Cov_i(r, c) / std_i(r) (population covariance, GRPO's
    unbiased std). [B, G] x2 -> float."""
    return float((advantages.double() * correct.double()).mean()) if advantages.numel() else 0.0


def expected_direction(top_reward_accuracy: float) -> str:
    """`rise` when the reward's top-ranked sample is right on more than half of the prompts,
    else `fall` (docs/probe.md: the rule and where it comes from)."""
    return "rise" if top_reward_accuracy > 0.5 else "fall"


# Below these, a direction is drawn from a handful of answers: noise (docs/probe.md, "When the probe
# cannot tell"). Why these three: the rule reads the share of labelled prompts whose top sample is
# right (its standard error is 0.125 at 16 prompts), a sample without an extracted answer is wrong
# for every reward alike (the extractor, not the reward, decides it), and only a group holding
# both a right and a wrong sample lets a reward rank right above wrong at all.
MIN_LABELLED_PROMPTS = 16
MIN_ANSWER_RATE = 0.5
MIN_MIXED_GROUPS = 4


def mixed_groups(correct: torch.Tensor) -> int:
    """The number of groups holding both a right and a wrong sample. [B, G] 0/1 -> int."""
    right = correct > 0.5
    return int((right.any(dim=1) & (~right).any(dim=1)).sum())


def undetermined_reason(labelled_prompts: int, answer_rate: float, mixed: int) -> str | None:
    """Why the probe cannot tell a direction from this sample (None: it can). `answer_rate`: the
    share of samples with an extracted answer; `mixed`: `mixed_groups` of the labelled groups."""
    reasons = []
    if labelled_prompts < MIN_LABELLED_PROMPTS:
        reasons.append(f"{labelled_prompts} labelled prompts (a direction needs >= {MIN_LABELLED_PROMPTS})")
    if answer_rate < MIN_ANSWER_RATE:
        reasons.append(f"answers extracted from {answer_rate:.0%} of the samples (needs >= {MIN_ANSWER_RATE:.0%}: "
                       "pick an extractor and prompt format this model answers in)")
    if mixed < MIN_MIXED_GROUPS:
        reasons.append(f"{mixed} groups hold both a right and a wrong sample (needs >= {MIN_MIXED_GROUPS}: "
                       "no reward can rank right above wrong elsewhere)")
    return "; ".join(reasons) or None


def p_maj_histogram(p_maj: torch.Tensor, majority_correct: torch.Tensor | None, group_size: int) -> dict[str, list]:
    """Counts of prompts per p_maj value k/G (k = 0..G), split by whether the majority is right
    (`correct`, `wrong`, `unlabelled`). [B] x2 -> {"p_maj": [...], "correct": [...], ...}."""
    bins = torch.round(p_maj.double() * group_size).long().clamp(0, group_size)
    out: dict[str, list] = {"p_maj": [k / group_size for k in range(group_size + 1)]}
    kinds = {"all": torch.ones_like(bins, dtype=torch.bool)}
    if majority_correct is not None:
        labelled = ~torch.isnan(majority_correct)
        kinds = {"correct": labelled & (majority_correct > 0.5), "wrong": labelled & (majority_correct <= 0.5),
                 "unlabelled": ~labelled}
    for kind, rows in kinds.items():
        out[kind] = torch.bincount(bins[rows], minlength=group_size + 1).tolist()
    return out


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks, tied values sharing their mean rank. [N] -> [N] float64."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    ranks = torch.empty_like(values, dtype=torch.float64)
    start = 0
    n = values.numel()
    while start < n:
        end = start
        while end + 1 < n and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


# --------------------------------------------------------------------------- ranking (`urlvr probe --rank`)
@dataclass(frozen=True)
class RankedReward:
    """One reward's place in a model's ranking (docs/probe.md, "Ranking rewards for a model")."""

    reward: str
    rank: int | None  # 1 = best; None: undetermined (ranked after every determined reward)
    top_reward_accuracy: float | None  # the sort key: share of labelled prompts whose top sample is right
    standard_error: float | None  # sqrt(p (1 - p) / n) over the n labelled prompts
    group_auroc: float | None  # the tie-break: how the reward ranks right above wrong among siblings
    direction: str | None  # "rise" | "fall" | "undetermined"
    reason: str | None = None  # why undetermined (None when ranked)


def rank_rewards(rewards: Sequence[Any], labelled_prompts: int, undetermined: str | None = None) -> list[RankedReward]:
    """Rewards sorted best first for one model: by top-reward Label Accuracy (descending), ties by
    within-group AUROC (descending; None counts as 0.5, chance), then by name. A reward whose
    direction cannot be drawn ranks after all determined ones, in the same order, with the reason:
    the model's `undetermined` reason (too few labelled prompts, answers or mixed groups), no
    labelled prompts, or a score constant in every group (GRPO gets no signal from it, and its "top"
    sample is just the first one).

    `rewards`: objects with `reward`, `top_reward_accuracy`, `group_auroc` and
    `zero_variance_groups` (a share in [0, 1]), e.g. `urlvr.commands.probe.RewardProbe`.
    Why this key: it is the quantity the paper's Theorem 1 says training converges on (each prompt
    concentrates on the answer the reward ranks first), and the one whose order matched the
    measured training runs in docs/probe.md, where `adv x correct` did not."""
    entries = []
    for item in rewards:
        top = item.top_reward_accuracy
        reason = undetermined
        if top is None:
            reason = reason or "no labelled prompts (the ranking reads correctness)"
        elif item.zero_variance_groups >= 1.0:
            reason = reason or "constant in every group (no GRPO signal; its top sample is just the first one)"
        se = math.sqrt(top * (1 - top) / labelled_prompts) if top is not None and labelled_prompts > 0 else None
        direction = "undetermined" if reason else expected_direction(top)
        entries.append(RankedReward(item.reward, None, top, se, item.group_auroc, direction, reason))

    def key(entry: RankedReward) -> tuple:
        auroc_ = 0.5 if entry.group_auroc is None else entry.group_auroc
        top = -1.0 if entry.top_reward_accuracy is None else entry.top_reward_accuracy
        return (-top, -auroc_, entry.reward)

    ordered = sorted(entries, key=key)
    determined = [e for e in ordered if e.reason is None]
    undetermined_ = [e for e in ordered if e.reason is not None]  # after every determined one, same order
    return [replace(e, rank=i + 1) for i, e in enumerate(determined)] + undetermined_
