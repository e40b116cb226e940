"""CISPO: Clipped IS-weight Policy Optimization (MiniMax 2025, "MiniMax-M1", arXiv:2506.13585, Sec. 3.1).

    algorithm:
      loss: {name: cispo, clip_eps_high: 0.28}   # clip_eps_low: null = no lower bound (the paper's choice)
      loss_aggregation: token-mean               # the paper's 1/Σ_i |o_i|

Why: PPO's clip zeroes the gradient of a token whose ratio left the trust region, and the
tokens that leave it first are the rare ones ("However", "Wait") that start reflection. CISPO
clips the importance WEIGHT instead and stops its gradient, so every token keeps a REINFORCE
gradient, scaled by a bounded weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from urlvr.algorithms.policy_losses import LOG_RATIO_CLAMP, POLICY_LOSSES, PolicyLoss, PolicyLossResult


@dataclass(frozen=True)
class CISPOOutput:
    per_token_loss: torch.Tensor  # [B, T] loss to minimise; 0 where the mask is 0
    ratio: torch.Tensor  # [B, T] ρ = π/π_old (detached); 1 where the mask is 0
    clipped: torch.Tensor  # [B, T] bool, the weight was clipped (response tokens only)


def cispo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_eps_low: float | None,
    clip_eps_high: float,
) -> CISPOOutput:
    """L = -sg(clip(ρ, 1-ε_low, 1+ε_high)) · A · log π; ρ = exp(log π - log π_old).

    MiniMax-M1 (2025), Eq. 4-5. The gradient is -clip(ρ)·A·∇log π on EVERY token: no token leaves
    the gradient (unlike PPO's clip, whose gradient is 0 where the clip is active). The paper
    imposes no lower bound (ε_low "a large value"): `clip_eps_low=None`. On-policy (ρ = 1) the
    gradient is PPO's, -A·∇log π. The loss VALUE is -w·A·log π, not comparable with PPO's.
    log ρ is clamped to ±20 before exp. Padding (even NaN log-probs) reaches neither the loss nor
    its gradient. `advantages` `[B]` or `[B, T]`; `[B, T] x2, adv, [B, T] -> CISPOOutput`.
    """
    mask = response_mask.bool()  # [B, T]
    adv = advantages if advantages.ndim == 2 else advantages.unsqueeze(-1)  # [B, T] or [B, 1]
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0).detach()  # [B, T]
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [B, T]
    low = None if clip_eps_low is None else 1.0 - clip_eps_low
    weight = ratio.clamp(min=low, max=1.0 + clip_eps_high)  # [B, T], no gradient
    loss = -weight * adv * torch.where(mask, logprobs, 0.0)  # [B, T]
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return CISPOOutput(torch.where(mask, loss, zero), ratio, (weight != ratio) & mask)


@POLICY_LOSSES.register("cispo")
class CISPOLoss(PolicyLoss):
    """CISPO (MiniMax-M1, 2025): REINFORCE on every token with a clipped, stop-gradient importance
    weight; logs `clip_fraction` (tokens whose weight was clipped) and `ratio_mean/min/max`.
    Defined with `token-mean` only: MiniMax-M1's Eq. 4 normalises by 1/Σ_i |o_i| over the batch
    (DAPO's token-level loss); a per-response mean would be another objective."""

    name: Literal["cispo"] = "cispo"
    ratio_knobs: ClassVar[tuple[str, ...]] = ("clip_eps_low", "clip_eps_high")
    aggregations: ClassVar[tuple[str, ...] | None] = ("token-mean",)
    clip_eps_low: float | None = Field(None, ge=0.0, le=1.0)
    """Lower clip of the weight at 1 - clip_eps_low; null = no lower bound (MiniMax-M1: none imposed)."""
    clip_eps_high: float = Field(0.28, ge=0.0)
    """Upper clip of the weight at 1 + clip_eps_high; the one the paper tunes (its value is not
    stated there: 0.28 is DAPO's clip-higher, an assumption)."""

    def __call__(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                 response_mask: torch.Tensor) -> PolicyLossResult:
        out = cispo_loss(logprobs, old_logprobs, advantages, response_mask,
                         clip_eps_low=self.clip_eps_low, clip_eps_high=self.clip_eps_high)
        mask = response_mask.bool()
        tokens = int(mask.sum())
        if tokens == 0:
            nan = float("nan")
            return PolicyLossResult(out.per_token_loss, {"clip_fraction": 0.0, "ratio_mean": nan,
                                                         "ratio_min": nan, "ratio_max": nan})
        ratio = out.ratio[mask].double()
        return PolicyLossResult(out.per_token_loss, {
            "clip_fraction": int(out.clipped.sum()) / tokens, "ratio_mean": float(ratio.mean()),
            "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max())})
