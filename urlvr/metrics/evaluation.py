"""Evaluation on labelled prompts: avg@k, pass@k (unbiased estimator) and maj@k.

avg@k  = mean over prompts of c/k (the expected single-sample accuracy),
pass@k = 1 - C(n-c, k) / C(n, k) (Chen et al. 2021; with n = k it is "any sample correct"),
maj@k  = whether the majority answer of the k samples equals the label,
greedy = whether the greedy (argmax) response's answer equals the label (optional).
The paper evaluates with k = 32, temperature 0.6, top-p 0.95 (the recipe's defaults).

"Correct" is, by default, "the extracted answer equals the normalised label". Tasks whose answers
are not strings to compare (Countdown: any expression that uses the numbers and reaches the
target) name a *judge*, a registered reward whose score > 0.5 means correct (`eval.judge`).
A judge that verifies under a time limit (`math_verify`) counts a verdict that ran out of time as
incorrect, and the count is reported as `<name>/judge_timeouts` (summed over ranks), so a slow
or loaded verifier is never mistaken for a weaker model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from math import comb
from typing import Any

import torch

from urlvr.algorithms.voting import majority_answer
from urlvr.data.records import PromptRecord
from urlvr.rewards.base import REWARDS, RewardContext, call_reward
from urlvr.rewards.extractors import make_extractor, normalize_answer, sample_answer
from urlvr.rollout.base import Group, PromptInput, RolloutEngine, SamplingParams
from urlvr.dist import all_reduce_sum


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """pass@k = 1 - C(n-c, k) / C(n, k), unbiased from n samples of which c are correct.

    Undefined for k > n (k draws without replacement from n samples): a ValueError, never a
    silent 1.0. `evaluate` always asks for k = n = `eval.samples_per_prompt`.
    """
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"pass@k: num_correct must lie in [0, num_samples={num_samples}], got {num_correct}")
    if not 1 <= k <= num_samples:
        raise ValueError(f"pass@k is undefined for k={k} with num_samples={num_samples} (needs 1 <= k <= num_samples)")
    if num_samples - num_correct < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def evaluate(
    engine: RolloutEngine, records: Sequence[PromptRecord], prompts: Sequence[PromptInput], *,
    samples_per_prompt: int, sampling: SamplingParams, extractor: str | Callable[[str], str | None],
    name: str = "eval", greedy: bool = False, judge: str | None = None,
    extractor_kwargs: Mapping[str, Any] | None = None, answer_from_truncated: bool = True,
) -> dict[str, float]:
    """Sample k answers per (labelled) prompt on this rank's shard and return rank-reduced scores.

    `extractor` is a registered extractor's name (bound to `extractor_kwargs`) or an extractor
    already bound (the trainer passes the run's own, `RunSettings.extract`). Without
    `answer_from_truncated` a response cut at the token cap has no answer (`reward.answer_from_truncated`)."""
    extract = extractor if callable(extractor) else make_extractor(extractor, extractor_kwargs)
    answer = functools.partial(sample_answer, extract=extract, from_truncated=answer_from_truncated)
    groups = engine.generate(list(prompts), samples_per_prompt, sampling) if prompts else []
    greedy_groups = engine.generate(list(prompts), 1, replace(sampling, greedy=True)) if greedy and prompts else []
    sums = torch.zeros(6, dtype=torch.float64)  # avg@k, pass@k, maj@k, prompts, greedy correct, judge timeouts
    for group, record in zip(groups, records, strict=True):
        answers = [answer(s) for s in group.samples]
        verdicts, timeouts = judge_outcome(group, record, answers, extract, judge)
        correct = sum(verdicts)
        majority = majority_answer(answers)
        majority_correct = majority is not None and any(v for a, v in zip(answers, verdicts) if a == majority)
        sums += torch.tensor([
            correct / len(answers), pass_at_k(len(answers), correct, len(answers)),
            float(majority_correct), 1.0, 0.0, float(timeouts),
        ], dtype=torch.float64)
    if greedy:
        for group, record in zip(greedy_groups, records, strict=True):
            verdicts, timeouts = judge_outcome(group, record, [answer(group.samples[0])], extract, judge)
            sums[4:6] += torch.tensor([float(verdicts[0]), timeouts], dtype=torch.float64)
    sums = all_reduce_sum(sums)
    count = max(1.0, float(sums[3]))
    k = samples_per_prompt
    return {
        f"{name}/avg@{k}": float(sums[0]) / count,
        f"{name}/pass@{k}": float(sums[1]) / count,
        f"{name}/maj@{k}": float(sums[2]) / count,
        f"{name}/prompts": float(sums[3]),
        **({f"{name}/greedy_accuracy": float(sums[4]) / count} if greedy else {}),
        **({f"{name}/judge_timeouts": float(sums[5])} if judge is not None and REWARDS.get(judge).is_timed({}) else {}),
    }


def judge_samples(group: Group, record: PromptRecord, answers: Sequence[str | None], extract, judge: str | None,
                  tokenizer: Any = None) -> list[bool]:
    """Per sample: correct? By label equality, or by the ``judge`` reward's score > 0.5 (it sees
    the group as a training reward would, with the label readable; no token statistics)."""
    return judge_outcome(group, record, answers, extract, judge, tokenizer)[0]


def judge_outcome(group: Group, record: PromptRecord, answers: Sequence[str | None], extract, judge: str | None,
                  tokenizer: Any = None) -> tuple[list[bool], int]:
    """`judge_samples`' verdicts, and how many of the judge's verifications ran out of time
    (those samples count as incorrect; 0 without a timed judge)."""
    if judge is None:
        label = normalize_answer(record.label)
        return [a is not None and a == label for a in answers], 0
    ctx = RewardContext.for_group(answers, torch.ones(group.size, 1), extract_answer=extract, label=record.label,
                                  metadata=record.metadata, question=record.prompt, tokenizer=tokenizer)
    out = call_reward(REWARDS.get(judge), group, ctx, {})  # registered: the recipe named it
    return [score > 0.5 for score in out.scores], out.timeouts
