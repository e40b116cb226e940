"""Token filters: which response tokens train, chosen once per mini-batch, for entropy control.

    algorithm:
      loss: ppo_clip                                   # any loss: the filter acts on its per-token loss
      token_filter: {name: high_entropy, top_fraction: 0.2}

A certainty reward (self-certainty, token entropy) pays the policy for confidence, so entropy
collapses fast; these filters act on the tokens that drive the collapse. Why a section of its own
rather than knobs of `ppo_clip` or separate losses: each filter only selects tokens and changes
their per-token loss, so it composes with every loss (ppo_clip, cispo, a plugin's) instead of
being re-implemented inside each; and why per mini-batch: a selection by quantile, top-k or
random subset over a micro-batch would change with micro_batch_size (DESIGN: micro-batching
changes no gradient). The selection reads the rollout's statistics (the scoring pass's entropy
and log-probs), which equal the current policy's on the first update (exactly under Table 7's
on-policy settings); the trainer gathers the mini-batch over ranks before selecting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, model_validator

from urlvr.section import VariantSection, check_variant_name
from urlvr.registry import Registry


@dataclass(frozen=True)
class TokenSelection:
    selected: torch.Tensor  # [B, T] bool, the tokens the filter acts on (response tokens only)
    metrics: dict[str, float] = field(default_factory=dict)  # logged as `actor/token_filter/<key>`


class TokenFilter(VariantSection):
    """Base of a token filter section: `select(...)` once per mini-batch (global over ranks), then
    `apply(...)` on each micro-batch's per-token loss with that micro-batch's rows of the selection."""

    def stats(self) -> tuple[str, ...]:
        """Token statistics of the rollout (scoring pass) that `select` reads."""
        return ()

    def select(self, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
               token_stats: dict[str, torch.Tensor], generator: torch.Generator) -> TokenSelection:
        raise NotImplementedError

    def apply(self, per_token_loss: torch.Tensor, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
              selected: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


TOKEN_FILTERS: Registry[type[TokenFilter]] = Registry("token filter", check=check_variant_name)


# --------------------------------------------------------------------------- pure functions
TIE_TOLERANCE = 1e-5  # relative: float32 carries about 7 digits; layouts differ in the last 1-2


def top_fraction_mask(values: torch.Tensor, response_mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """keep_t = m_t ∧ (v_t ≥ τ - ε), τ = the ⌈q·N⌉-th largest v over the N response tokens (ties kept).

    Wang et al. 2025 ("Beyond the 80/20 Rule", Eq. 4): I[H_t ≥ τ_ρ], τ_ρ the top-ρ entropy
    quantile of the batch. No response token: nothing kept. `[B, T] x2 -> [B, T] bool`.
    ε = TIE_TOLERANCE·max(|τ|, 1): a tie is a tie to float32 rounding. Why: the samples of one
    prompt often share a value (the first token's entropy), and the same value computed in two
    micro-batch layouts (other padded widths, other matmul shapes) differs in its last bits; an
    exact comparison let the layout break the tie and select other tokens.
    """
    mask = response_mask.bool()
    count = int(mask.sum())
    k = math.ceil(fraction * count)
    if k == 0:
        return torch.zeros_like(mask)
    threshold = values[mask].topk(k).values[-1]
    return mask & (values >= threshold - TIE_TOLERANCE * threshold.abs().clamp_min(1.0))


def token_covariance(logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Cov_t = (log π_t - mean log π)·(A_t - mean A), means over the N response tokens; 0 on padding.

    Cui et al. 2025 ("The Entropy Mechanism of RL for Reasoning LMs", Eq. 10-11): the per-token
    term whose sum drives the entropy change; a few tokens with large covariance collapse entropy.
    `advantages` `[B]` (broadcast) or `[B, T]`. Computed in float64. `[B, T], adv, [B, T] -> [B, T]`.
    """
    mask = response_mask.bool()
    adv = (advantages if advantages.ndim == 2 else advantages.unsqueeze(-1)).double().expand(mask.shape)
    logp = torch.where(mask, logprobs.detach().double(), 0.0)  # [B, T]
    count = max(int(mask.sum()), 1)
    mean_logp = logp.sum() / count
    mean_adv = torch.where(mask, adv, 0.0).sum() / count
    return torch.where(mask, (logp - mean_logp) * (adv - mean_adv), 0.0)


def covariance_metrics(cov: torch.Tensor, response_mask: torch.Tensor, selected: torch.Tensor) -> dict[str, float]:
    """cov_mean/max over response tokens, selected_fraction, cov_selected_mean (0 when none is selected)."""
    mask = response_mask.bool()
    if not mask.any():
        return {"cov_mean": 0.0, "cov_max": 0.0, "selected_fraction": 0.0, "cov_selected_mean": 0.0}
    values = cov[mask]
    chosen = cov[selected & mask]
    return {"cov_mean": float(values.mean()), "cov_max": float(values.max()),
            "selected_fraction": chosen.numel() / values.numel(),
            "cov_selected_mean": float(chosen.mean()) if chosen.numel() else 0.0}


def clip_cov_mask(cov: torch.Tensor, response_mask: torch.Tensor, fraction: float, cov_low: float, cov_high: float,
                  generator: torch.Generator) -> torch.Tensor:
    """I_clip = ⌊r·N⌋ tokens drawn uniformly without replacement from {t : ω_low ≤ Cov_t ≤ ω_high} (all if fewer).

    Clip-Cov's selection (Cui et al. 2025, Sec. 4.2, Eq. 12). `generator` makes the draw
    reproducible (the trainer seeds it per step and mini-batch). `[B, T] x2 -> [B, T] bool`.
    """
    mask = response_mask.bool()
    count = math.floor(fraction * int(mask.sum()))
    candidates = torch.nonzero((mask & (cov >= cov_low) & (cov <= cov_high)).flatten()).flatten()
    chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]
    out = torch.zeros(mask.numel(), dtype=torch.bool)
    out[chosen] = True
    return out.view(mask.shape).to(mask.device)


def top_k_mask(values: torch.Tensor, response_mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """I_KL = the ⌊k·N⌋ response tokens with the largest values (ties broken by position).

    KL-Cov's selection (Cui et al. 2025, Sec. 4.2, Eq. 13). `[B, T] x2 -> [B, T] bool`.
    """
    mask = response_mask.bool()
    count = math.floor(fraction * int(mask.sum()))
    flat = torch.where(mask, values, torch.tensor(float("-inf"), dtype=values.dtype)).flatten()
    out = torch.zeros(mask.numel(), dtype=torch.bool)
    if count:
        out[flat.topk(count).indices] = True
    return out.view(mask.shape).to(mask.device) & mask


# --------------------------------------------------------------------------- variants
@TOKEN_FILTERS.register("none")
class NoTokenFilter(TokenFilter):
    """Every token trains (the default)."""

    name: Literal["none"] = "none"


@TOKEN_FILTERS.register("high_entropy")
class HighEntropyFilter(TokenFilter):
    """Train only on the top-q highest-entropy ("forking") tokens of each mini-batch (Wang et al. 2025,
    "Beyond the 80/20 Rule"): the other tokens' loss and gradient are 0; the aggregation's
    normalisers still count every token, as the paper's objective does."""

    name: Literal["high_entropy"] = "high_entropy"
    top_fraction: float = Field(0.2, gt=0.0, le=1.0)
    """Fraction q of the mini-batch's response tokens that train, by rollout entropy (paper: 0.2)."""

    def stats(self) -> tuple[str, ...]:
        return ("entropy",)

    def select(self, old_logprobs, advantages, response_mask, token_stats, generator) -> TokenSelection:
        entropy = token_stats["entropy"]
        keep = top_fraction_mask(entropy, response_mask, self.top_fraction)
        mask = response_mask.bool()
        threshold = float(entropy[keep].min()) if keep.any() else 0.0
        kept = int(keep.sum()) / max(int(mask.sum()), 1)
        return TokenSelection(keep, {"selected_fraction": kept, "entropy_threshold": threshold})

    def apply(self, per_token_loss, logprobs, old_logprobs, selected) -> torch.Tensor:
        return torch.where(selected, per_token_loss, torch.zeros((), dtype=per_token_loss.dtype))


@TOKEN_FILTERS.register("clip_cov")
class ClipCovFilter(TokenFilter):
    """Clip-Cov (Cui et al. 2025): detach the gradient of a random ⌊r·N⌋ tokens whose covariance
    Cov_t lies in [cov_low, cov_high]; their loss value is kept, their gradient is 0."""

    name: Literal["clip_cov"] = "clip_cov"
    fraction: float = Field(2e-4, gt=0.0, le=1.0)
    """Clip ratio r: the share of the mini-batch's response tokens detached (paper: 2e-4)."""
    cov_low: float = 1.0
    """Lower covariance bound ω_low of the candidates (paper: 1)."""
    cov_high: float = 5.0
    """Upper covariance bound ω_high of the candidates (paper: 5)."""

    @model_validator(mode="after")
    def _band(self) -> ClipCovFilter:
        if self.cov_low > self.cov_high:
            raise ValueError(f"cov_low ({self.cov_low}) must not exceed cov_high ({self.cov_high}): no token could be chosen")
        return self

    def select(self, old_logprobs, advantages, response_mask, token_stats, generator) -> TokenSelection:
        cov = token_covariance(old_logprobs, advantages, response_mask)
        chosen = clip_cov_mask(cov, response_mask, self.fraction, self.cov_low, self.cov_high, generator)
        return TokenSelection(chosen, covariance_metrics(cov, response_mask, chosen))

    def apply(self, per_token_loss, logprobs, old_logprobs, selected) -> torch.Tensor:
        return torch.where(selected, per_token_loss.detach(), per_token_loss)


@TOKEN_FILTERS.register("kl_cov")
class KLCovFilter(TokenFilter):
    """KL-Cov (Cui et al. 2025): add coef·|log π - log π_old| (the authors' per-token KL, as merged
    into verl) to the loss of the ⌊k·N⌋ tokens with the largest covariance."""

    name: Literal["kl_cov"] = "kl_cov"
    fraction: float = Field(2e-3, gt=0.0, le=1.0)
    """Share k of the mini-batch's response tokens penalised (paper: 2e-3 for Qwen2.5-7B, 2e-4 for 32B)."""
    coef: float = Field(1.0, gt=0.0)
    """KL coefficient β on the selected tokens (paper: 1)."""

    def select(self, old_logprobs, advantages, response_mask, token_stats, generator) -> TokenSelection:
        cov = token_covariance(old_logprobs, advantages, response_mask)
        chosen = top_k_mask(cov, response_mask, self.fraction)
        return TokenSelection(chosen, covariance_metrics(cov, response_mask, chosen))

    def apply(self, per_token_loss, logprobs, old_logprobs, selected) -> torch.Tensor:
        penalty = self.coef * torch.where(selected, logprobs - old_logprobs, 0.0).abs()  # [B, T]
        return per_token_loss + penalty
