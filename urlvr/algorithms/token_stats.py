"""Per-token statistics of the policy's next-token distribution, computed from logits chunks.

The scoring pass computes, once per rollout batch, exactly the statistics some part of the run
declared (rewards' `stats=`, `dynamics.token_metrics`, collapse detectors; `logprob` for the
update's old log-probs) and lends them to rewards and the update. Each function maps logits
`[..., V]` (float32, already divided by the temperature), their logsumexp `[...]` and the sampled
tokens `[...]` to a `[...]` tensor. A plugin registers its own with `@TOKEN_STATS.register(name)`.

Masked vocabulary entries (logit -inf, p = 0; also after division by any temperature) are
allowed: 0 * log 0 counts as 0, so every statistic stays finite (`logprob` of a p = 0 token is
-inf, as it should be; the sampler never draws one). Self-certainty's uniform reference U runs
over the entries with a finite logit: KL(U_V || pi) itself is +inf as soon as one entry has
p = 0, which would make the reward meaningless; a masked entry is treated as not in the
vocabulary. Without masked entries this is exactly KL(U_V || pi). Mask with -inf, not with a
large finite negative number: such an entry stays in U and dominates the value (finite, but huge).
"""

from __future__ import annotations

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
    """H(pi_t) = -sum_v pi_v log pi_v, with log pi = z - logsumexp(z) and 0 log 0 = 0.

    Not logsumexp(z) - sum_v pi_v z_v: that cancels catastrophically for large logits and gives
    NaN for a -inf logit (0 * -inf). The masked log keeps the entropy bonus's gradient finite too.
    log_softmax, not z - lse: at |z| ~ 1e4 a float32 lse has lost the digits the entropy needs.
    """
    log_probs = torch.log_softmax(logits, dim=-1)  # [..., V]
    probs = log_probs.exp()
    return -(probs * log_probs.masked_fill(probs == 0, 0.0)).sum(-1)


@TOKEN_STATS.register("self_certainty")
def self_certainty(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL(U || pi_t) = -(1/V) sum_v log pi_v - log V (RLIF's per-token self-certainty, Table 1).

    U and V range over the entries with a finite logit (see the module docstring). Each log pi_v
    is divided by V before the sum, so a float32 sum cannot overflow.
    """
    finite = logits > float("-inf")  # [..., V]
    size = finite.sum(-1, keepdim=True).to(logits.dtype)  # [..., 1]
    log_probs = (logits - lse.unsqueeze(-1)).div_(size).masked_fill_(~finite, 0.0)  # log pi_v / V
    return -log_probs.sum(-1) - size.squeeze(-1).log()


@TOKEN_STATS.register("top1_prob")
def top1_prob(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """max_v pi_t(v)."""
    return torch.exp(logits.max(-1).values - lse)


@TOKEN_STATS.register("top2_prob")
def top2_prob(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Second-largest pi_t(v) (RLSF's probability disparity is top1 - top2)."""
    return torch.exp(logits.topk(2, dim=-1).values[..., 1] - lse)


def compute_token_stats(logits: torch.Tensor, targets: torch.Tensor, names: tuple[str, ...],
                        lse: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """All requested statistics for one chunk, sharing one logsumexp (`lse`, computed when not given)."""
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    return {name: TOKEN_STATS.get(name)(logits, lse, targets) for name in names}
