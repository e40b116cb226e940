"""Per-token statistics of the policy's next-token distribution, computed from logits chunks.

The scoring pass computes, once per rollout batch, exactly the statistics some part of the run
declared (rewards' `stats=`, `dynamics.token_metrics`, collapse detectors; `logprob` for the
update's old log-probs) and lends them to rewards and the update. Each function maps logits
`[..., V]` (float32, already divided by the temperature), their logsumexp `[...]` and the sampled
tokens `[...]` to a `[...]` tensor. A plugin registers its own with `@TOKEN_STATS.register(name)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from urlvr.registry import Registry

TokenStat = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TOKEN_STATS: Registry[TokenStat] = Registry("token statistic")
BUILTIN_TOKEN_STATS = ("logprob", "entropy", "self_certainty", "top1_prob", "top2_prob")


@TOKEN_STATS.register("logprob")
def sampled_logprob(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(y_t) = z_{y_t} - logsumexp(z)."""
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse


@TOKEN_STATS.register("entropy")
def token_entropy(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """H(pi_t) = logsumexp(z) - sum_v pi_v z_v."""
    return lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)


@TOKEN_STATS.register("self_certainty")
def self_certainty(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL(U || pi_t) = logsumexp(z) - mean_v z_v - log V (RLIF's per-token self-certainty, Table 1)."""
    return lse - logits.mean(-1) - math.log(logits.shape[-1])


@TOKEN_STATS.register("top1_prob")
def top1_prob(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """max_v pi_t(v)."""
    return torch.exp(logits.max(-1).values - lse)


@TOKEN_STATS.register("top2_prob")
def top2_prob(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Second-largest pi_t(v) (RLSF's probability disparity is top1 - top2)."""
    return torch.exp(logits.topk(2, dim=-1).values[..., 1] - lse)


def compute_token_stats(logits: torch.Tensor, targets: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """All requested statistics for one chunk, sharing one logsumexp."""
    lse = torch.logsumexp(logits, dim=-1)
    return {name: TOKEN_STATS.get(name)(logits, lse, targets) for name in names}
