"""Training-dynamics metrics of one rollout batch (paper App. B.2), as pure functions.

Metrics that need labels are absent (not zero) when no prompt in the batch has a label.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from urlvr.rewards.voting import majority_answer
from urlvr.rollout.base import Group


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """sum(values * mask) / sum(mask), 0.0 for an empty mask."""
    total = mask.sum()
    return float((values * mask).sum() / total) if total > 0 else 0.0


def response_metrics(groups: Sequence[Group]) -> dict[str, float]:
    lengths = torch.tensor([len(s.token_ids) for g in groups for s in g.samples], dtype=torch.float64)
    truncated = [s.finish_reason == "length" for g in groups for s in g.samples]
    return {
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/truncation_rate": sum(truncated) / len(truncated),
    }


def reward_metrics(total: torch.Tensor, per_term: dict[str, torch.Tensor]) -> dict[str, float]:
    """Proxy reward statistics; total is [B, G]."""
    std = total.std(dim=1, unbiased=False) if total.shape[1] > 1 else torch.zeros(total.shape[0])
    metrics = {
        "reward/proxy_mean": float(total.mean()),
        "reward/proxy_std": float(total.std(unbiased=False)),
        "reward/zero_variance_group_fraction": float((std == 0).float().mean()),
    }
    for name, scores in per_term.items():
        metrics[f"reward/{name}_mean"] = float(scores.mean())
    return metrics


def label_metrics(
    answers: Sequence[Sequence[str | None]], labels: Sequence[str | None],
    proxy: torch.Tensor, oracle: torch.Tensor | None,
) -> dict[str, float]:
    """Ground Truth Reward (Eq. 41), Label Accuracy of the majority answer (Eq. 39) and Reward
    Accuracy (Eq. 40: agreement of the proxy reward, thresholded at 0.5, with the oracle), over
    the prompts that have a label. Empty when none has."""
    if oracle is None:
        return {}
    labelled = [i for i, label in enumerate(labels) if label is not None]
    if not labelled:
        return {}
    gt = oracle[labelled]  # [M, G]
    from urlvr.rewards.extractors import normalize_answer

    majority_correct = [
        float(majority_answer(answers[i]) == normalize_answer(labels[i])) for i in labelled
    ]
    proxy_binary = (proxy[labelled] > 0.5).float()
    return {
        "reward/ground_truth_mean": float(gt.mean()),
        "dynamics/label_accuracy": sum(majority_correct) / len(majority_correct),
        "dynamics/reward_accuracy": float((proxy_binary == gt).float().mean()),
    }


def majority_ratio(answers: Sequence[Sequence[str | None]]) -> float:
    """Mean over prompts of p_maj: the share of samples voting for the majority answer."""
    ratios = []
    for group in answers:
        majority = majority_answer(group)
        ratios.append(sum(a is not None and a == majority for a in group) / len(group) if majority else 0.0)
    return sum(ratios) / len(ratios)
