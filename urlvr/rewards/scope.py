"""SCOPE (Wang et al., arXiv 2512.15146): step-confidence-weighted votes within subgroups.

TTRL votes once per prompt with one vote per sample. SCOPE changes both halves:
  * weight: a sample's vote counts its average step confidence, c(y) = mean over the steps of
    y (split at "\\n\\n") of the mean token confidence C_t in the step;
  * subgroups: the trained samples are cut into consecutive subgroups of size m; each subgroup
    gets its own pseudo-label, the confidence-weighted vote of `votes_per_subgroup` samples drawn
    without replacement from the prompt's pool (a bootstrap "local consensus"), so different
    subgroups may be rewarded for different answers (denser, more diverse reward);
  * m is searched every step over the powers of two dividing G: for each m, the batch's reward
    rate (mean reward) and vote diversity (mean number of distinct subgroup labels per prompt);
    the Pareto front of the two, min-max normalised, picks the m nearest the ideal corner
    (1, 1) under sqrt(lam (1 - rate)^2 + (1 - lam)(1 - diversity)^2).

The search runs over the whole batch, so it lives in the reward's batch phase (`prepare`);
scoring reads the token log-probs of the trainer's scoring pass: no extra forward pass.

Choices where the paper and its code (szu-tera/SCOPE) differ or are silent, stated so they can
be tested (docs/rewards.md, "SCOPE"):
  * token confidence C_t = -(1/k) sum_{j<=k} log P_t(j) over the top-k next-token probabilities
    (the paper); the code asks vLLM for `logprobs=0`, which returns the sampled token only, so
    its C_t = -log pi(y_t). `top_k=0` is the code's (default), 1 and 2 the paper's with the
    statistics urlvr computes (top1_prob, top2_prob); larger k would need a new statistic;
  * the code zips confidences with the answers after dropping the samples without one, which
    misaligns them; here every sample keeps its own weight and samples without an answer do
    not vote;
  * the code redraws the bootstrap after choosing m; here the labels of the chosen m are the
    ones the search measured (one draw per step, seeded by `seed` and the batch's token ids);
  * the pool is the trained group (the code's scripts vote with all 64 trained samples); a
    recipe that draws extra voting samples (`reward.vote_group_size`) is refused, since those
    samples have no token statistics to weigh them.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from urlvr.rewards.base import RewardContext, RewardOutput, reward
from urlvr.rollout.base import Group

TopK = Literal[0, 1, 2]


def scope_stats(top_k: TopK = 0, **_: Any) -> tuple[str, ...]:
    """The token statistics SCOPE's confidence reads for this `top_k`."""
    return {0: ("logprob",), 1: ("top1_prob",), 2: ("top1_prob", "top2_prob")}.get(top_k, ("logprob",))


def token_confidence(stats: dict[str, torch.Tensor] | Any, top_k: int) -> torch.Tensor:
    """C_t = -(1/k) sum_{j<=k} log P_t(j) (arXiv 2512.15146, Method: token confidence); k=0: -log pi(y_t).  -> [G, T] float64."""
    if top_k == 0:
        return -stats["logprob"].to(torch.float64)
    tiny = torch.finfo(torch.float64).tiny  # log 0 -> a large finite value, never inf
    total = -torch.log(stats["top1_prob"].to(torch.float64).clamp(min=tiny))
    if top_k == 2:
        total = total - torch.log(stats["top2_prob"].to(torch.float64).clamp(min=tiny))
    return total / top_k


def step_spans(token_texts: Sequence[str], delimiter: str) -> list[tuple[int, int]]:
    """[start, end) token ranges of the steps: a step ends with the token that completes an
    occurrence of the delimiter, which may straddle tokens (a character-level tokenizer spells
    "\n\n" as two "\n" tokens); a trailing remainder is a step too (the code's `split_steps`,
    which splits the text)."""
    spans, start, carry = [], 0, ""
    for index, text in enumerate(token_texts):
        window = carry + text  # the delimiter's first characters may end the previous tokens
        if delimiter in window:
            spans.append((start, index + 1))
            start, carry = index + 1, ""
        else:
            carry = window[max(0, len(window) - len(delimiter) + 1):]  # all a straddling delimiter can reuse
    if start < len(token_texts):
        spans.append((start, len(token_texts)))
    return spans


def average_step_confidence(confidence: torch.Tensor, mask: torch.Tensor, spans: Sequence[tuple[int, int]]) -> float:
    """c(y) = (1/|S|) sum_s (1/|s|) sum_{t in s} C_t over the steps with a scored token; 0 without one.

    confidence, mask: [T] for one response.
    """
    means = []
    for start, end in spans:
        keep = mask[start:end] > 0
        if keep.any():
            means.append(float(confidence[start:end][keep].mean()))
    return sum(means) / len(means) if means else 0.0


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float]) -> str | None:
    """argmax_a sum_i w_i 1[a_i = a] over the samples with an answer; ties go to the answer seen
    first; None when no sample has an answer."""
    score: dict[str, float] = {}
    for answer, weight in zip(answers, weights, strict=True):
        if answer is not None:
            score[answer] = score.get(answer, 0.0) + float(weight)
    if not score:
        return None
    best = max(score.values())
    return next(a for a, s in score.items() if s == best)


def subgroup_labels(answers: Sequence[str | None], weights: Sequence[float], subgroup_size: int, votes: int,
                    rng: random.Random) -> list[str | None]:
    """One pseudo-label per sample: sample i's is its subgroup's (i // subgroup_size) weighted
    vote over `votes` samples drawn without replacement from the whole group."""
    size = len(answers)
    labels: list[str | None] = []
    for _ in range(size // subgroup_size):
        drawn = rng.sample(range(size), votes)
        label = weighted_vote([answers[i] for i in drawn], [weights[i] for i in drawn])
        labels.extend([label] * subgroup_size)
    return labels


def candidate_sizes(group_size: int) -> list[int]:
    """The subgroup sizes searched: the powers of two that divide G (the code: 1, 2, ..., 64 for
    G = 64), plus G itself when it is not one."""
    sizes = [2**p for p in range(group_size.bit_length()) if group_size % 2**p == 0]
    return sizes if group_size in sizes else [*sizes, group_size]


def pareto_choice(rates: Sequence[float], diversities: Sequence[float], lam: float) -> int:
    """Index of the Pareto-optimal candidate nearest (1, 1) after min-max normalisation:
    argmin sqrt(lam (1 - r~)^2 + (1 - lam)(1 - d~)^2); ties go to the smaller index."""
    n = len(rates)
    front = [i for i in range(n) if not any(
        rates[j] >= rates[i] and diversities[j] >= diversities[i] and (rates[j] > rates[i] or diversities[j] > diversities[i])
        for j in range(n))]
    r_lo, r_hi = min(rates[i] for i in front), max(rates[i] for i in front)
    d_lo, d_hi = min(diversities[i] for i in front), max(diversities[i] for i in front)
    best, best_distance = front[0], math.inf
    for i in front:
        r = (rates[i] - r_lo) / (r_hi - r_lo + 1e-8)  # the code's 1e-8 keeps a one-point front finite
        d = (diversities[i] - d_lo) / (d_hi - d_lo + 1e-8)
        distance = math.sqrt(lam * (1 - r) ** 2 + (1 - lam) * (1 - d) ** 2)
        if distance < best_distance:
            best, best_distance = i, distance
    return best


@dataclass(frozen=True)
class ScopeLabels:
    """What the batch phase hands each group: a pseudo-label per sample and how it was chosen."""

    labels: tuple[str | None, ...]
    subgroup_size: int
    confidences: tuple[float, ...]


def _confidences(group: Group, ctx: RewardContext, top_k: int, delimiter: str, texts_of: dict[int, str]) -> list[float]:
    """c(y) per sample. `texts_of` memoises each token id's text over the batch (one decode per
    distinct id, not per position: a step of 64 x 8 responses of 7k tokens would be 3.6M decodes)."""
    if ctx.vote_answers is not None and len(ctx.vote_answers) > len(ctx.answers):
        raise ValueError("scope votes with the trained samples only (their token statistics weigh the votes); "
                         "remove reward.vote_group_size")
    confidence = token_confidence(ctx.token_stats, top_k)  # [G, T]
    out = []
    for j, sample in enumerate(group.samples):
        length = min(len(sample.token_ids), confidence.shape[1])
        if ctx.tokenizer is None:
            texts = [""] * length  # without a tokenizer: the response is one step
        else:
            for t in set(sample.token_ids[:length]) - texts_of.keys():
                texts_of[t] = ctx.tokenizer.decode([t], skip_special_tokens=False)
            texts = [texts_of[t] for t in sample.token_ids[:length]]
        out.append(average_step_confidence(confidence[j, :length], ctx.response_mask[j, :length], step_spans(texts, delimiter)))
    return out


def _seed(seed: int, groups: Sequence[Group]) -> int:
    """A per-batch seed: the recipe's `seed` and the batch's token ids (a fixed seed alone would
    draw the same subsets every step)."""
    crc = zlib.crc32(str(seed).encode())
    for group in groups:
        for sample in group.samples:
            crc = zlib.crc32(repr(sample.token_ids).encode(), crc)
    return crc


def prepare_scope(groups: Sequence[Group], contexts: Sequence[RewardContext], policy: Any, *, top_k: TopK = 0,
                  step_delimiter: str = "\n\n", subgroup_size: int | None = None,
                  votes_per_subgroup: int | None = None, lam: float = 0.7, seed: int = 0) -> list[ScopeLabels]:
    """The batch phase: confidences, then the subgroup size (searched or fixed) and its labels.
    An empty batch (a rank with no group this round) has nothing to label."""
    if not groups:
        return []
    texts_of: dict[int, str] = {}
    weights = [_confidences(g, c, top_k, step_delimiter, texts_of) for g, c in zip(groups, contexts, strict=True)]
    rng = random.Random(_seed(seed, groups))
    sizes_of = {id(g): [subgroup_size] if subgroup_size is not None else candidate_sizes(g.size) for g in groups}
    sizes = sorted({m for g in groups for m in sizes_of[id(g)]})
    candidates: dict[int, list[list[str | None]]] = {}
    for m in sizes:  # a group whose G m does not divide keeps its largest feasible size
        candidates[m] = [subgroup_labels(c.answers, w, _fit(m, g.size, subgroup_size), _votes(votes_per_subgroup, g.size), rng)
                         for g, c, w in zip(groups, contexts, weights, strict=True)]
    chosen = sizes[0]
    if subgroup_size is None and len(sizes) > 1:
        rates, diversities = [], []
        for m in sizes:
            hits = [float(a is not None and a == lab) for c, labs in zip(contexts, candidates[m]) for a, lab in zip(c.answers, labs)]
            rates.append(sum(hits) / max(1, len(hits)))
            diversities.append(sum(len(set(labs)) for labs in candidates[m]) / max(1, len(groups)))
        chosen = sizes[pareto_choice(rates, diversities, lam)]
    return [ScopeLabels(tuple(labs), _fit(chosen, g.size, subgroup_size), tuple(w))
            for g, labs, w in zip(groups, candidates[chosen], weights, strict=True)]


def _fit(m: int, group_size: int, fixed: int | None) -> int:
    if fixed is not None:
        if group_size % fixed:
            raise ValueError(f"scope: subgroup_size={fixed} does not divide the group of {group_size} samples")
        return fixed
    return max(k for k in candidate_sizes(group_size) if k <= m)


def _votes(votes: int | None, group_size: int) -> int:
    if votes is None:
        return (group_size + 1) // 2
    if votes > group_size:
        raise ValueError(f"scope: votes_per_subgroup={votes} exceeds the group of {group_size} samples")
    return votes


@reward("scope", family="verdict", stats=scope_stats, prepare=prepare_scope)
def scope(
    group: Group, ctx: RewardContext, *, top_k: TopK = 0, step_delimiter: str = "\n\n", subgroup_size: int | None = None,
    votes_per_subgroup: int | None = None, lam: float = 0.7, seed: int = 0,
) -> RewardOutput:
    """SCOPE: r(y_i) = 1[ans(y_i) = argmax_a sum_{j in B_s(i)} c(y_j) 1[ans(y_j) = a]]  (arXiv 2512.15146, Method: step-wise confidence, subgroup pseudo-labels).

    c(y) is the average step confidence, B_s(i) the `votes_per_subgroup` samples drawn for
    sample i's subgroup; samples without an answer score 0 and do not vote. Knobs: `top_k`
    (0: the code's sampled-token surprisal; 1, 2: the paper's top-k), `step_delimiter` (the
    text that ends a step), `subgroup_size` (None: the per-step Pareto search),
    `votes_per_subgroup` (None: half the group, the code's 32 of 64), `lam` (the search's weight
    of the reward rate against the vote diversity, in [0, 1]; 0.7, the code's), `seed` (of the
    bootstrap draw, mixed with the batch's token ids).
    """
    prepared = ctx.prepared if isinstance(ctx.prepared, ScopeLabels) else prepare_scope(
        [group], [ctx], None, top_k=top_k, step_delimiter=step_delimiter, subgroup_size=subgroup_size,
        votes_per_subgroup=votes_per_subgroup, lam=lam, seed=seed)[0]
    scores = [float(a is not None and a == label) for a, label in zip(ctx.answers, prepared.labels, strict=True)]
    distinct = float(len(set(prepared.labels)))
    return RewardOutput(scores=scores, diagnostics={
        "subgroup_size": [float(prepared.subgroup_size)] * len(scores),
        "distinct_labels": [distinct] * len(scores),
        "step_confidence": list(prepared.confidences),
    })


def _check(*, top_k: int = 0, step_delimiter: str = "\n\n", subgroup_size: int | None = None,
           votes_per_subgroup: int | None = None, lam: float = 0.7, seed: int = 0) -> None:
    if top_k not in (0, 1, 2):
        raise ValueError(f"scope: top_k must be 0, 1 or 2 (the statistics urlvr computes), got {top_k!r}")
    if not step_delimiter:
        raise ValueError("scope: step_delimiter must not be empty")
    if subgroup_size is not None and subgroup_size < 1:
        raise ValueError(f"scope: subgroup_size must be >= 1 or null (searched), got {subgroup_size}")
    if votes_per_subgroup is not None and votes_per_subgroup < 1:
        raise ValueError(f"scope: votes_per_subgroup must be >= 1 or null (half the group), got {votes_per_subgroup}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"scope: lam must lie in [0, 1], got {lam}")


def _check_given(**kwargs: Any) -> None:
    """The load-time check: the values (`_check`), then the knobs that would do nothing."""
    _check(**kwargs)
    if "lam" in kwargs and kwargs.get("subgroup_size") is not None:
        raise ValueError(f"scope: lam weighs the subgroup-size search, and subgroup_size={kwargs['subgroup_size']} "
                         "fixes the size (no search): drop lam or set subgroup_size null")


def check_group(*, group_size: int, vote_group_size: int | None, **kwargs: Any) -> None:
    """The load-time check against the recipe's group (`rollout.group_size`, `reward.vote_group_size`)."""
    if vote_group_size is not None and vote_group_size > group_size:
        raise ValueError(f"scope votes with the trained samples only (their token statistics weigh the votes): "
                         f"remove reward.vote_group_size ({vote_group_size})")
    subgroup_size, votes = kwargs.get("subgroup_size"), kwargs.get("votes_per_subgroup")
    if subgroup_size is not None and group_size % subgroup_size:
        raise ValueError(f"scope: subgroup_size={subgroup_size} does not divide rollout.group_size ({group_size})")
    if votes is not None and votes > group_size:
        raise ValueError(f"scope: votes_per_subgroup={votes} exceeds rollout.group_size ({group_size}): the votes "
                         "are drawn without replacement from the group")
    idle = [k for k in ("top_k", "step_delimiter") if k in kwargs]
    if idle and _votes(votes, group_size) == 1:
        raise ValueError(f"scope: {' and '.join(idle)} {'shape' if len(idle) > 1 else 'shapes'} the confidence that weighs the votes, and each "
                         f"subgroup's label is one sample's vote (votes_per_subgroup "
                         f"{votes if votes is not None else f'null = half of {group_size}'} = 1): drop "
                         f"{'them' if len(idle) > 1 else 'it'} or vote with 2 or more")


scope.check = _check_given  # type: ignore[attr-defined]
scope.check_group = check_group  # type: ignore[attr-defined]
