"""Evaluation on labelled prompts: avg@k, pass@k (unbiased estimator) and maj@k.

avg@k  = mean over prompts of c/k (the expected single-sample accuracy),
pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021; with n = k it is "any sample correct"),
maj@k  = whether the majority answer of the k samples equals the label,
greedy = whether the greedy (argmax) response's answer equals the label (optional).
The paper evaluates with k = 32, temperature 0.6, top-p 0.95 (the recipe's defaults).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from math import comb

import torch

from urlvr.data.records import PromptRecord
from urlvr.rewards.extractors import EXTRACTORS, normalize_answer
from urlvr.rewards.voting import majority_answer
from urlvr.rollout.base import PromptInput, RolloutEngine, SamplingParams
from urlvr.trainer.distributed import all_reduce_sum


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def evaluate(
    engine: RolloutEngine, records: Sequence[PromptRecord], prompts: Sequence[PromptInput], *,
    samples_per_prompt: int, sampling: SamplingParams, extractor: str, name: str = "eval", greedy: bool = False,
) -> dict[str, float]:
    """Sample k answers per (labelled) prompt on this rank's shard and return rank-reduced scores."""
    extract = EXTRACTORS.get(extractor)
    groups = engine.generate(list(prompts), samples_per_prompt, sampling) if prompts else []
    greedy_groups = engine.generate(list(prompts), 1, replace(sampling, greedy=True)) if greedy and prompts else []
    sums = torch.zeros(5, dtype=torch.float64)  # avg@k, pass@k, maj@k, prompts, greedy correct
    for group, record in zip(groups, records, strict=True):
        label = normalize_answer(record.label)
        answers = [extract(s.text) for s in group.samples]
        correct = sum(a == label for a in answers)
        sums += torch.tensor([
            correct / len(answers), pass_at_k(len(answers), correct, len(answers)),
            float(majority_answer(answers) == label), 1.0, 0.0,
        ], dtype=torch.float64)
    for group, record in zip(greedy_groups, records, strict=True):
        sums[4] += float(extract(group.samples[0].text) == normalize_answer(record.label))
    sums = all_reduce_sum(sums)
    count = max(1.0, float(sums[3]))
    k = samples_per_prompt
    return {
        f"{name}/avg@{k}": float(sums[0]) / count,
        f"{name}/pass@{k}": float(sums[1]) / count,
        f"{name}/maj@{k}": float(sums[2]) / count,
        f"{name}/prompts": float(sums[3]),
        **({f"{name}/greedy_accuracy": float(sums[4]) / count} if greedy else {}),
    }
