"""Scores for a whole rollout batch: the recipe's weighted terms, plus the oracle for metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from urlvr.rewards.base import REWARDS, RewardContext, call_reward
from urlvr.rollout.base import Group


@dataclass(frozen=True)
class RewardTermSpec:
    name: str
    weight: float
    kwargs: Mapping[str, Any]


@dataclass(frozen=True)
class BatchRewards:
    total: torch.Tensor  # [B, G] the training reward (weighted sum of terms)
    per_term: dict[str, torch.Tensor]  # term name -> [B, G]
    oracle: torch.Tensor | None  # [B, G], NaN rows where a prompt has no label; None if no oracle
    diagnostics: dict[str, torch.Tensor]  # "<term>/<name>" -> [B, G]


def score_batch(
    groups: Sequence[Group],
    contexts: Sequence[RewardContext],
    terms: Sequence[RewardTermSpec],
    oracle: str | None,
) -> BatchRewards:
    """Call every term once per group (never per sample), and the oracle where labels exist."""
    per_term: dict[str, list[list[float]]] = {}
    diagnostics: dict[str, list[list[float]]] = {}
    for term in terms:
        spec = REWARDS.get(term.name)
        rows = []
        for group, ctx in zip(groups, contexts, strict=True):
            out = call_reward(spec, group, ctx, term.kwargs)
            rows.append(list(out.scores))
            for key, values in out.diagnostics.items():
                diagnostics.setdefault(f"{term.name}/{key}", []).append([float(v) for v in values])
        per_term[term.name] = rows
    tensors = {name: torch.tensor(rows, dtype=torch.float32) for name, rows in per_term.items()}
    total = sum(term.weight * tensors[term.name] for term in terms)
    return BatchRewards(
        total=total,
        per_term=tensors,
        oracle=_oracle_scores(groups, contexts, oracle),
        diagnostics={k: torch.tensor(v, dtype=torch.float32) for k, v in diagnostics.items()},
    )


def _oracle_scores(groups: Sequence[Group], contexts: Sequence[RewardContext], oracle: str | None) -> torch.Tensor | None:
    if oracle is None or not any(ctx.has_label for ctx in contexts):
        return None
    spec = REWARDS.get(oracle)
    rows = []
    for group, ctx in zip(groups, contexts, strict=True):
        if ctx.has_label:
            rows.append(list(call_reward(spec, group, ctx, {}).scores))
        else:
            rows.append([float("nan")] * group.size)
    return torch.tensor(rows, dtype=torch.float32)
