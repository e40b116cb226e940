"""Plugin parts for the step-core tests, loaded through a recipe's `plugins` as users do: a
policy loss with a knob of its own, a token statistic that counts its calls, and a reward that
declares that statistic."""

from typing import Literal

import torch
from pydantic import Field

from urlvr.algorithms.policy_losses import POLICY_LOSSES, PolicyLoss, PolicyLossResult
from urlvr.algorithms.token_stats import TOKEN_STATS
from urlvr.rewards.base import reward

STAT_CALLS: list[tuple[int, ...]] = []  # shape of every chunk the plugin statistic was computed on


@POLICY_LOSSES.register("test_truncated_pg")
class TruncatedPolicyGradient(PolicyLoss):
    """L = -A · min(ρ, max_ratio) per token (REINFORCE with a truncated importance ratio)."""

    name: Literal["test_truncated_pg"] = "test_truncated_pg"
    max_ratio: float = Field(2.0, gt=1.0)
    """Upper bound of the importance ratio."""

    def __call__(self, logprobs, old_logprobs, advantages, response_mask) -> PolicyLossResult:
        mask = response_mask.bool()
        ratio = torch.exp(torch.where(mask, logprobs - old_logprobs, 0.0))  # [B, T]
        per_token = -advantages.unsqueeze(-1) * ratio.clamp(max=self.max_ratio)
        truncated = (ratio > self.max_ratio) & mask
        return PolicyLossResult(torch.where(mask, per_token, 0.0),
                                {"truncated_fraction": float(truncated.sum()) / max(1, int(mask.sum())),
                                 "max_ratio_knob": self.max_ratio})


@POLICY_LOSSES.register("test_entropy_weighted_pg")
class EntropyWeightedPolicyGradient(PolicyLoss):
    """L = -A · ρ · sg(H_t) per token: reads the current policy's entropy, declared in `stats()`."""

    name: Literal["test_entropy_weighted_pg"] = "test_entropy_weighted_pg"

    def stats(self) -> tuple[str, ...]:
        return ("entropy",)

    def __call__(self, logprobs, old_logprobs, advantages, response_mask, *, token_stats) -> PolicyLossResult:
        mask = response_mask.bool()
        entropy = token_stats["entropy"]  # [B, T], from the training forward
        ratio = torch.exp(torch.where(mask, logprobs - old_logprobs, 0.0))
        per_token = -advantages.unsqueeze(-1) * ratio * entropy.detach()
        return PolicyLossResult(torch.where(mask, per_token, 0.0),
                                {"entropy_seen_mean": float(entropy[mask].mean()),
                                 "entropy_has_grad": float(entropy.requires_grad)})


@TOKEN_STATS.register("test_max_logit")
def max_logit(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """max_v z_v (a plugin statistic)."""
    STAT_CALLS.append(tuple(logits.shape[:-1]))
    return logits.max(-1).values


@reward("test_reads_max_logit", stats=("test_max_logit",))
def reads_max_logit(group, ctx):
    """Mean max-logit over the response (declares the plugin statistic it reads)."""
    stat, mask = ctx.token_stats["test_max_logit"], ctx.response_mask.float()
    return ((stat * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()


@reward("test_declares_unknown_stat", stats=("test_no_such_stat",))
def declares_unknown(group, ctx):
    """Declares a statistic nobody registered: the recipe must fail to load."""
    return [0.0] * group.size
