"""The training forward's log-probs through the LM head without keeping `[N, V]` logits for the
backward pass.

Autograd through `lm_head(hidden).log_softmax()` saves every chunk's `[n, V]` float32 logits
until the backward: with a 32k-150k vocabulary that is the largest tensor of a long-response
step (8,192 tokens x 32,768 entries = 1 GiB), however finely the forward is chunked. Here the
forward keeps each token's logsumexp (`[N]`) only, and the backward recomputes one chunk's
logits at a time: memory `[rows, V]`, at the cost of a second head matmul in the backward
(about 3% of a step for a 7B model, more for tiny models with a large vocabulary).

Exact: d log pi(y) / d z = onehot(y) - softmax(z), the same gradient autograd computes
(`tests/test_token_stats.py` compares both in float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from urlvr.algorithms.token_stats import TOKEN_STATS, compute_token_stats


def recomputes_in_backward(lm_head: nn.Module, stats: tuple[str, ...], raw_stats: tuple[str, ...]) -> bool:
    """Whether `chunked_logprob` can serve this forward: gradients on, `logprob` the only statistic
    that needs them, and a plain `nn.Linear` head whose weight is all here (not a LoRA-wrapped
    head; not partitioned by ZeRO-3, whose gathering happens in module forward hooks only)."""
    return (torch.is_grad_enabled() and stats == ("logprob",) and not raw_stats
            and type(lm_head) is nn.Linear and not hasattr(lm_head.weight, "ds_id"))


def chunked_logprob(hidden: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor, temperature: float,
                    rows: int, detached: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """`{"logprob": log softmax(lm_head(hidden) / T)[targets]` `[N]` (differentiable), and each of
    `detached` (token statistics, no gradient) `[N]`}. hidden `[N, H]`, targets `[N]`; `rows`
    tokens per chunk bound the transient `[rows, V]` logits."""
    values = _ChunkedLogprob.apply(hidden, lm_head.weight, lm_head.bias, targets, temperature, rows, detached)
    return dict(zip(("logprob", *detached), values))


class _ChunkedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, rows, detached):
        n = hidden.shape[0]
        logprob = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        extra: dict[str, list[torch.Tensor]] = {name: [] for name in detached}
        for start in range(0, n, rows):
            end = min(start + rows, n)
            logits = F.linear(hidden[start:end], weight, bias).float() / temperature  # [rows, V]
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            logprob[start:end] = TOKEN_STATS.get("logprob")(logits, lse[start:end], targets[start:end])
            for name, value in compute_token_stats(logits, targets[start:end], detached, lse[start:end]).items():
                extra[name].append(value)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.rows = temperature, rows
        outputs = [torch.cat(extra[name]) if n else logprob.new_empty(0) for name in detached]
        ctx.mark_non_differentiable(*outputs)
        return (logprob, *outputs)

    @staticmethod
    def backward(ctx, grad_logprob, *_):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        total = torch.promote_types(weight.dtype, torch.float32)  # sums over tokens: float32 at least
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=total, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=total, device=bias.device) if want_bias else None
        for start in range(0, hidden.shape[0], ctx.rows):
            end = min(start + ctx.rows, hidden.shape[0])
            logits = F.linear(hidden[start:end], weight, bias).float() / ctx.temperature
            upstream = grad_logprob[start:end, None].float()  # [rows, 1]
            # d logprob / d logits = onehot(target) - softmax; then through the division by T
            grad_logits = torch.exp(logits - lse[start:end, None]).mul_(-upstream)
            grad_logits.scatter_add_(-1, targets[start:end, None], upstream).div_(ctx.temperature)
            if want_hidden:
                grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if want_weight:
                grad_weight += grad_logits.to(total).T @ hidden[start:end].to(total)
            if want_bias:
                grad_bias += grad_logits.to(total).sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None)
