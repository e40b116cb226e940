"""Sampler/trainer mismatch corrections: importance weights of the sampled responses under the
trainer's policy, fixed once per step (`algorithm.mismatch`).

    algorithm:
      mismatch: {name: token_tis, cap: 2.0}        # or seq_tis, seq_mis; `none` (default) = off

Why: a vLLM sampler's numerics (kernels, bf16, batch shapes) differ from the trainer's, so
"on-policy" responses were in fact drawn from π_sampler. Weighting the loss by π_trainer/π_sampler
makes the gradient an estimate under π_trainer again; truncating or masking bounds its variance
(Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training";
Liu et al. 2025, "When speed kills stability: demystifying RL collapse from the training-inference
mismatch", sequence-level truncated and masked IS). The weights are detached and multiply the
aggregation weights of every token of the loss (not the KL or entropy terms).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, model_validator

from urlvr.algorithms.losses import truncated_importance_weights
from urlvr.section import VariantSection, check_variant_name
from urlvr.registry import Registry


@dataclass(frozen=True)
class MismatchWeights:
    weights: torch.Tensor  # [B, T] detached; 1 on padding
    token_means: dict[str, float] = field(default_factory=dict)  # means over response tokens
    sequence_means: dict[str, float] = field(default_factory=dict)  # means over non-empty responses


class MismatchCorrection(VariantSection):
    """Base of a mismatch correction section: `weights(trainer_logprobs, sampler_logprobs, mask)`."""

    def weights(self, trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                response_mask: torch.Tensor) -> MismatchWeights | None:
        raise NotImplementedError


MISMATCH_CORRECTIONS: Registry[type[MismatchCorrection]] = Registry("mismatch correction", check=check_variant_name)


# --------------------------------------------------------------------------- pure functions
def sequence_log_ratio(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, response_mask: torch.Tensor,
                       form: str) -> torch.Tensor:
    """log ρ_i = Σ_t (log π_trainer - log π_sampler) (`product`), or that sum / |y_i| (`geometric_mean`).

    float64, detached; 0 for an empty response. `[B, T] x3 -> [B]`.
    """
    mask = response_mask.bool()
    diff = torch.where(mask, trainer_logprobs.detach().double() - sampler_logprobs.double(), 0.0)  # [B, T]
    total = diff.sum(dim=-1)  # [B]
    if form == "product":
        return total
    if form == "geometric_mean":
        return total / mask.sum(dim=-1).clamp(min=1)
    raise ValueError(f"unknown form {form!r}; known: product, geometric_mean")


def sequence_truncated_weights(log_ratio: torch.Tensor, cap: float) -> torch.Tensor:
    """w_i = min(ρ_i, C) with ρ_i = exp(log ρ_i) (sequence-level truncated IS, Liu et al. 2025). `[B] -> [B]`."""
    return torch.exp(log_ratio).clamp(max=cap)  # exp overflows to inf on a huge product: clamped to C


def sequence_masked_weights(log_ratio: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """w_i = ρ_i · 1[low ≤ ρ_i ≤ high] (sequence-level masked IS, Liu et al. 2025): a response whose
    ratio leaves the band is dropped, the others keep their IS weight. `[B] -> [B]`."""
    ratio = torch.exp(log_ratio)
    return torch.where((ratio >= low) & (ratio <= high), ratio, torch.zeros_like(ratio))


def _per_token(weights: torch.Tensor, response_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = response_mask.bool()
    return torch.where(mask, weights.unsqueeze(-1), torch.ones((), dtype=weights.dtype)).to(dtype)  # [B, T]


def _sequence_mean(values: torch.Tensor, response_mask: torch.Tensor) -> float:
    present = response_mask.bool().any(dim=-1)
    return float(values[present].double().mean()) if present.any() else 0.0


# --------------------------------------------------------------------------- variants
@MISMATCH_CORRECTIONS.register("none")
class NoCorrection(MismatchCorrection):
    """No correction (the default); the mismatch is still measured (`rollout/logprob_mismatch_*`)."""

    name: Literal["none"] = "none"

    def weights(self, trainer_logprobs, sampler_logprobs, response_mask) -> None:
        return None


@MISMATCH_CORRECTIONS.register("token_tis")
class TokenTIS(MismatchCorrection):
    """Token-level truncated IS: w_t = min(π_trainer(y_t)/π_sampler(y_t), cap) (Yao et al. 2025);
    logs `rollout/tis_weight_mean` and `rollout/tis_truncated_fraction` (over tokens)."""

    name: Literal["token_tis"] = "token_tis"
    cap: float = Field(2.0, ge=1.0)
    """Truncation C of each token's ratio."""

    def weights(self, trainer_logprobs, sampler_logprobs, response_mask) -> MismatchWeights:
        weights = truncated_importance_weights(trainer_logprobs, sampler_logprobs, response_mask, self.cap)
        mask = response_mask.bool()
        ratio = torch.exp(torch.where(mask, trainer_logprobs.detach().double() - sampler_logprobs.double(), 0.0))
        tokens = max(int(mask.sum()), 1)
        return MismatchWeights(weights, token_means={
            "rollout/tis_weight_mean": float(torch.where(mask, weights.double(), 0.0).sum()) / tokens,
            "rollout/tis_truncated_fraction": int((mask & (ratio > self.cap)).sum()) / tokens})


@MISMATCH_CORRECTIONS.register("seq_tis")
class SequenceTIS(MismatchCorrection):
    """Sequence-level truncated IS: every token of response i weighted by min(ρ_i, cap) (Liu et al.
    2025); logs `rollout/seq_tis_weight_mean`, `rollout/seq_tis_truncated_fraction` (over responses)."""

    name: Literal["seq_tis"] = "seq_tis"
    cap: float = Field(2.0, ge=1.0)
    """Truncation C of the sequence ratio."""
    form: Literal["product", "geometric_mean"] = "product"
    """ρ_i as the product of the token ratios (the likelihood ratio) or its length-normalised geometric mean."""

    def weights(self, trainer_logprobs, sampler_logprobs, response_mask) -> MismatchWeights:
        log_ratio = sequence_log_ratio(trainer_logprobs, sampler_logprobs, response_mask, self.form)  # [B]
        weights = sequence_truncated_weights(log_ratio, self.cap)  # [B]
        truncated = (torch.exp(log_ratio) > self.cap).double()
        return MismatchWeights(_per_token(weights, response_mask, trainer_logprobs.dtype), sequence_means={
            "rollout/seq_tis_weight_mean": _sequence_mean(weights, response_mask),
            "rollout/seq_tis_truncated_fraction": _sequence_mean(truncated, response_mask)})


@MISMATCH_CORRECTIONS.register("seq_mis")
class SequenceMIS(MismatchCorrection):
    """Sequence-level masked IS: response i weighted by ρ_i if low ≤ ρ_i ≤ high, else dropped (weight 0)
    (Liu et al. 2025); logs `rollout/seq_mis_masked_fraction` and `rollout/seq_mis_weight_mean`."""

    name: Literal["seq_mis"] = "seq_mis"
    low: float = Field(0.5, ge=0.0, le=1.0)
    """Lower edge of the band of kept ratios."""
    high: float = Field(2.0, ge=1.0)
    """Upper edge of the band of kept ratios."""
    form: Literal["product", "geometric_mean"] = "product"
    """ρ_i as the product of the token ratios or its length-normalised geometric mean (then use a narrow band)."""

    @model_validator(mode="after")
    def _band(self) -> SequenceMIS:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self

    def weights(self, trainer_logprobs, sampler_logprobs, response_mask) -> MismatchWeights:
        log_ratio = sequence_log_ratio(trainer_logprobs, sampler_logprobs, response_mask, self.form)  # [B]
        weights = sequence_masked_weights(log_ratio, self.low, self.high)  # [B]
        ratio = torch.exp(log_ratio)
        dropped = ((ratio < self.low) | (ratio > self.high)).double()  # [B]
        return MismatchWeights(_per_token(weights, response_mask, trainer_logprobs.dtype), sequence_means={
            "rollout/seq_mis_masked_fraction": _sequence_mean(dropped, response_mask),
            "rollout/seq_mis_weight_mean": _sequence_mean(weights, response_mask)})
