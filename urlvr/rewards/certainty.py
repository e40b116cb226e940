"""Certainty-based rewards (paper Table 1): the policy's confidence along its own response.

All five read per-token statistics of the trainer's one scoring forward (`ctx.token_stats`,
`[G, T]`, masked by `ctx.response_mask`), so none of them costs a forward pass; each declares
the statistics it reads (`stats=`), and the scoring pass computes only declared ones. Whether those
statistics come from temperature-scaled or raw logits is the recipe's `reward.certainty_logits`.

Conventions (not in the paper, stated so they can be tested):
  * sums and means run over response tokens including the final eos, as the sampler emitted it;
  * a response with no scored token (an all-zero mask row) gets 0.0 from every reward here;
  * arithmetic is float64, whatever the statistics' dtype.
"""

from __future__ import annotations

from typing import Literal

import torch

from urlvr.rewards.base import RewardContext, RewardOutput, reward
from urlvr.rewards.extractors import answer_char_span
from urlvr.rollout.base import Group


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1/|y|) sum_t values_t over the mask, per row; 0 for an empty row.  [G, T] -> [G] float64."""
    mask = mask.to(torch.float64)
    total = torch.where(mask > 0, values.to(torch.float64), 0.0).sum(-1)  # [G]
    count = mask.sum(-1)  # [G]
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)


def masked_token_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t values_t over the mask, per row.  [G, T] -> [G] float64."""
    return torch.where(mask > 0, values.to(torch.float64), 0.0).sum(-1)


def _stat(ctx: RewardContext, name: str) -> torch.Tensor:
    if name not in ctx.token_stats:
        raise KeyError(f"this reward reads the token statistic {name!r}, which no part of the run declared "
                       f"(declare it: @reward(..., stats=({name!r},))); the context lends {sorted(ctx.token_stats)}")
    return ctx.token_stats[name]  # [G, T]


@reward("self_certainty", family="certainty", stats=("self_certainty",))
def self_certainty(group: Group, ctx: RewardContext) -> list[float]:
    """RLIF: r(x, y) = (1/|y|) sum_t KL(U_V || pi_t)  (paper Table 1, Self-Certainty)."""
    return masked_token_mean(_stat(ctx, "self_certainty"), ctx.response_mask).tolist()


@reward("token_entropy", family="certainty", stats=("entropy",))
def token_entropy(group: Group, ctx: RewardContext) -> list[float]:
    """EM-RL, RENT: r(x, y) = -(1/|y|) sum_t H(pi_t)  (paper Table 1, Token-Level Entropy)."""
    return (-masked_token_mean(_stat(ctx, "entropy"), ctx.response_mask)).tolist()


@reward("trajectory_entropy", family="certainty", stats=("logprob",))
def trajectory_entropy(group: Group, ctx: RewardContext) -> list[float]:
    """EM-RL: r(x, y) = (1/|y|) sum_t log pi(y_t | x, y_<t)  (paper Table 1, Trajectory-Level Entropy)."""
    return masked_token_mean(_stat(ctx, "logprob"), ctx.response_mask).tolist()


@reward("probability", family="certainty", stats=("logprob",))
def probability(group: Group, ctx: RewardContext) -> list[float]:
    """RLSC: r(x, y) = prod_t pi(y_t | x, y_<t) = exp(sum_t log pi(y_t))  (paper Table 1, Probability).

    Computed as exp of a float64 sum; long responses underflow towards 0, as the formula does.
    """
    mask = ctx.response_mask
    scores = torch.exp(masked_token_sum(_stat(ctx, "logprob"), mask))  # [G]
    return torch.where(mask.sum(-1) > 0, scores, 0.0).tolist()


@reward("probability_disparity", family="certainty", stats=("top1_prob", "top2_prob"))
def probability_disparity(
    group: Group, ctx: RewardContext, *, span: Literal["answer", "response"] = "answer"
) -> RewardOutput:
    """RLSF: r(x, y) = (1/M) sum_{t in a} (pi_t^(1) - pi_t^(2))  (paper Table 1, Probability Disparity).

    pi_t^(1), pi_t^(2) are the largest and second-largest next-token probabilities. The sum runs
    over the M tokens of the final answer a (span="answer": the tokens that overlap the answer's
    characters, see `answer_char_span`; a sample with no locatable answer gets 0), or over the
    whole response (span="response").

    `span`: the tokens averaged over, `answer` (the paper's) or `response`.
    """
    gap = _stat(ctx, "top1_prob").to(torch.float64) - _stat(ctx, "top2_prob").to(torch.float64)  # [G, T]
    mask = ctx.response_mask.to(torch.float64)
    if span == "answer":
        mask = mask * answer_token_mask(group, ctx)
    elif span != "response":
        raise ValueError(f"span must be 'answer' or 'response', got {span!r}")
    return RewardOutput(
        scores=masked_token_mean(gap, mask).tolist(),
        diagnostics={"scored_tokens": mask.sum(-1).tolist()},
    )


def answer_token_mask(group: Group, ctx: RewardContext) -> torch.Tensor:
    """[G, T] 1.0 on the response tokens whose decoded text overlaps the answer's characters."""
    if ctx.tokenizer is None:
        raise ValueError("span='answer' needs the tokenizer in the reward context to locate answer tokens")
    mask = torch.zeros(ctx.response_mask.shape, dtype=torch.float64)
    for j, (sample, answer) in enumerate(zip(group.samples, ctx.answers, strict=True)):
        if answer is None:
            continue
        ids = list(sample.token_ids)
        text = ctx.tokenizer.decode(ids, skip_special_tokens=False)
        found = answer_char_span(text, answer)
        if found is None:
            continue
        first, last = token_range_for_chars(ids, ctx.tokenizer, *found)
        mask[j, first:last] = 1.0
    return mask


def token_range_for_chars(ids: list[int], tokenizer, start: int, end: int) -> tuple[int, int]:
    """Token indices [first, last) whose decoded text overlaps characters [start, end).

    Binary search over prefix decodes (O(log T) decodes), so multi-byte tokens that only form
    characters together are handled the same way the tokenizer renders them.
    """

    def prefix_len(k: int) -> int:
        return len(tokenizer.decode(ids[:k], skip_special_tokens=False))

    def first_prefix_longer_than(chars: int) -> int:  # smallest k with prefix_len(k) > chars
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if prefix_len(mid) > chars:
                hi = mid
            else:
                lo = mid + 1
        return lo

    first = first_prefix_longer_than(start) - 1  # the token that produces character `start`
    last = first_prefix_longer_than(end - 1)  # one past the token that produces character end-1
    return max(first, 0), max(last, first + 1)
