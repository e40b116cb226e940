"""GSPO: Group Sequence Policy Optimization (Zheng et al. 2025, arXiv:2507.18071), the loss of
Qwen3's RL: one importance ratio per RESPONSE, clipped per response.

    algorithm:
      loss: {name: gspo, clip_eps_low: 3.0e-4, clip_eps_high: 4.0e-4}
      loss_aggregation: seq-mean-token-mean    # the paper's 1/G Σ_i: one term per response

Why: a token-level ratio π(y_t)/π_old(y_t) is a one-sample importance weight, so its noise grows
with the response length and clipping it drops single tokens; the paper's sequence ratio is the
length-normalised likelihood ratio, s_i = (π(y_i)/π_old(y_i))^(1/|y_i|), whose clip keeps or
drops whole responses. Its clip ranges are therefore tiny (Sec. 5.1: 3e-4 and 4e-4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from urlvr.algorithms.policy_losses import LOG_RATIO_CLAMP, POLICY_LOSSES, PolicyLoss, PolicyLossResult


@dataclass(frozen=True)
class GSPOOutput:
    per_token_loss: torch.Tensor  # [B, T] loss to minimise; 0 where the mask is 0
    sequence_ratio: torch.Tensor  # [B] s_i (detached); 1 for an empty response
    clipped: torch.Tensor  # [B, T] bool, the clip was active (response tokens only)


def gspo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    token_level: bool = False,
) -> GSPOOutput:
    """L_i = max(-A_i·s_i, -A_i·clip(s_i, 1-ε_low, 1+ε_high)); s_i = exp((1/|y_i|) Σ_t (log π - log π_old)).

    GSPO (Zheng et al. 2025, Eq. 5 and 7). Sequence level (`token_level=False`): every token of
    response i carries L_i, with the gradient of s_i, so the recipe's `seq-mean-token-mean`
    aggregation gives the paper's 1/G Σ_i L_i exactly. GSPO-token (`token_level=True`, Eq. 13):
    s_it = sg[s_i] · π(y_t) / sg[π(y_t)], the same value as s_i but the gradient of token t only,
    so a `[B, T]` advantage A_it can weigh tokens differently; with one advantage per response
    GSPO-token equals GSPO in value and gradient (paper, Eq. 16).

    log s_i is clamped to ±20 before exp (as `ppo_clip` clamps log ρ). An empty response has
    s = 1 and loss 0; padding (even NaN log-probs) reaches neither the loss nor its gradient.
    `advantages`: `[B]`, or `[B, T]` for GSPO-token only. `[B, T] x2, [B], [B, T] -> GSPOOutput`.
    """
    mask = response_mask.bool()  # [B, T]
    if advantages.ndim == 2 and not token_level:
        raise ValueError("sequence-level GSPO takes one advantage per response ([B]); use gspo_token for [B, T]")
    lengths = mask.sum(dim=-1).clamp(min=1)  # [B]; an empty row divides 0 by 1
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)  # [B, T]
    seq_log_ratio = (log_ratio.sum(dim=-1) / lengths).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B]
    if token_level:
        current = torch.where(mask, logprobs, 0.0)  # [B, T]
        ratio = torch.exp(seq_log_ratio.detach().unsqueeze(-1) + current - current.detach())  # [B, T], value s_i
    else:
        ratio = torch.exp(seq_log_ratio).unsqueeze(-1).expand_as(log_ratio)  # [B, T], gradient of s_i
    adv = advantages if advantages.ndim == 2 else advantages.unsqueeze(-1)  # [B, T] or [B, 1]
    unclipped = -adv * ratio  # [B, T]
    clipped_loss = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)  # [B, T]
    loss = torch.maximum(unclipped, clipped_loss)
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return GSPOOutput(torch.where(mask, loss, zero), torch.exp(seq_log_ratio.detach()),
                      (clipped_loss > unclipped) & mask)


def gspo_metrics(out: GSPOOutput, response_mask: torch.Tensor) -> dict[str, float]:
    """clip_fraction = responses with an active clip / non-empty responses; token_clip_fraction over
    tokens (the paper's Fig. 2 counts tokens); ratio mean/min/max of s_i over non-empty responses."""
    mask = response_mask.bool()  # [B, T]
    present = mask.any(dim=-1)  # [B]
    if not present.any():
        nan = float("nan")
        return {"clip_fraction": 0.0, "token_clip_fraction": 0.0, "ratio_mean": nan, "ratio_min": nan, "ratio_max": nan}
    ratio = out.sequence_ratio[present].double()  # [B']
    return {
        "clip_fraction": float(out.clipped.any(dim=-1)[present].double().mean()),
        "token_clip_fraction": int(out.clipped.sum()) / int(mask.sum()),
        "ratio_mean": float(ratio.mean()),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
    }


@POLICY_LOSSES.register("gspo")
class GSPOLoss(PolicyLoss):
    """GSPO (Zheng et al. 2025): the length-normalised sequence ratio s_i, clipped per response;
    logs `clip_fraction` (responses), `token_clip_fraction` and `ratio_mean/min/max` (of s_i).
    Defined at the sequence level only: J = 1/G Σ_i L_i (Eq. 5; GSPO-token, Eq. 13: 1/G Σ_i
    1/|y_i| Σ_t), which `seq-mean-token-mean` gives exactly because every token of response i
    carries L_i; `token-mean` would weigh each response by its length, another objective."""

    name: Literal["gspo"] = "gspo"
    ratio_knobs: ClassVar[tuple[str, ...]] = ("clip_eps_low", "clip_eps_high")
    aggregations: ClassVar[tuple[str, ...] | None] = ("seq-mean-token-mean",)
    clip_eps_low: float = Field(3e-4, ge=0.0, le=1.0)
    """Lower clip range of the sequence ratio: s_i clipped at 1 - clip_eps_low (paper, Sec. 5.1: 3e-4)."""
    clip_eps_high: float = Field(4e-4, ge=0.0, le=10.0)
    """Upper clip range of the sequence ratio: s_i clipped at 1 + clip_eps_high (paper, Sec. 5.1: 4e-4)."""

    _token_level = False

    def __call__(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                 response_mask: torch.Tensor) -> PolicyLossResult:
        out = gspo_loss(logprobs, old_logprobs, advantages, response_mask, clip_eps_low=self.clip_eps_low,
                        clip_eps_high=self.clip_eps_high, token_level=self._token_level)
        return PolicyLossResult(out.per_token_loss, gspo_metrics(out, response_mask))


@POLICY_LOSSES.register("gspo_token")
class GSPOTokenLoss(GSPOLoss):
    """GSPO-token (Zheng et al. 2025, Eq. 13): s_it = sg[s_i]·π(y_t)/sg[π(y_t)]; equal to GSPO with one
    advantage per response, and the form that admits per-token advantages."""

    name: Literal["gspo_token"] = "gspo_token"  # type: ignore[assignment]

    _token_level = True
