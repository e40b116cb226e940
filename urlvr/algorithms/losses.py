"""KL estimators, sampler-mismatch weights and loss aggregation, as pure tensor functions
(the policy losses themselves are variants in `policy_losses.py`).

Shapes: B responses in the (micro-)batch, T response tokens (right-padded), V vocabulary.
`response_mask [B, T]` is 1 (or True) on real response tokens. Each swappable part is chosen by
name from the recipe's `algorithm` section through a registry: `KL_ESTIMATORS`, `LOSS_AGGREGATIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from urlvr.registry import Registry

# --------------------------------------------------------------------------- KL to reference
KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("kl estimator")


def kl_estimator(name: str, *, loss_gradient: str | None) -> Callable[[KLEstimator], KLEstimator]:
    """Register a KL estimator. `loss_gradient` says what differentiating it as a loss term on
    samples from π estimates (None: nothing useful, so the recipe refuses it as `algorithm.kl_estimator`)."""

    def add(fn: KLEstimator) -> KLEstimator:
        fn.loss_gradient = loss_gradient  # type: ignore[attr-defined]
        return KL_ESTIMATORS.register(name)(fn)

    return add


# Why k1 is refused as a loss: on tokens y ~ π, ∇_θ E[log π(y) - log π_ref(y)] taken through the
# sample's log-prob only is E_π[∇ log π] = Σ_y ∇π(y) = 0: it never pulls towards the reference.
@kl_estimator("k1", loss_gradient=None)
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log π - log π_ref: unbiased for KL(π‖π_ref) under samples from π, high variance, can be < 0.

    Schulman, "Approximating KL divergence" (2020 blog). A value estimator only: its expected
    gradient as a loss term is zero. `[B, T], [B, T] -> [B, T]`.
    """
    return logprobs - ref_logprobs


@kl_estimator("k2", loss_gradient="∇KL(π‖π_ref): E_π[(log π - log π_ref) ∇log π]")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π - log π_ref)²: biased, low variance, ≥ 0.

    Schulman, "Approximating KL divergence" (2020 blog). As a loss on samples from π its
    expected gradient is E_π[(log π - log π_ref) ∇log π] = ∇KL(π‖π_ref), the reverse KL's
    exact gradient. `[B, T], [B, T] -> [B, T]`.
    """
    return 0.5 * (logprobs - ref_logprobs).square()


@kl_estimator("k3", loss_gradient="∇KL(π_ref‖π): E_π[(1 - π_ref/π) ∇log π]")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log π_ref - log π) - (log π_ref - log π) - 1: unbiased, low variance, ≥ 0.

    Schulman, "Approximating KL divergence" (2020 blog); the estimator GRPO uses
    (Shao et al. 2024, DeepSeekMath, Eq. 4). Unclamped, unlike verl's `low_var_kl`.
    As a loss on samples from π its expected gradient is E_π[(1 - π_ref/π) ∇log π] =
    -Σ_y π_ref(y) ∇log π(y) = ∇KL(π_ref‖π): the *forward* KL's gradient, not the reverse KL
    whose value it estimates. `[B, T], [B, T] -> [B, T]`.
    """
    log_ref_ratio = ref_logprobs - logprobs  # [B, T]
    return torch.expm1(log_ref_ratio) - log_ref_ratio


# --------------------------------------------------------------------------- sampler mismatch
def truncated_importance_weights(
    trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, response_mask: torch.Tensor, cap: float,
) -> torch.Tensor:
    """w = min(π_trainer / π_sampler, cap) per token, detached; 1 where the mask is 0.

    Why: a vLLM sampler's numerics (kernels, bf16, batch shapes) differ from the trainer's, so
    "on-policy" tokens were in fact drawn from π_sampler. Weighting each token's loss by the
    truncated ratio makes the gradient an estimate under π_trainer again, with the variance
    bounded by ``cap`` (truncated IS: Ionides 2008; for RL with vLLM, Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"). `[B, T] x3 -> [B, T]`.
    """
    ratio = torch.exp((trainer_logprobs.detach() - sampler_logprobs).double()).clamp(max=cap)
    return torch.where(response_mask.bool(), ratio, torch.ones_like(ratio)).to(trainer_logprobs.dtype)


# --------------------------------------------------------------------------- aggregation
# Every mode is a set of per-token weights over the WHOLE mini-batch, so the loss is
# Σ weights · per_token_loss. Micro-batches (and ranks) then each add their share computed with
# the mini-batch's global counts, and gradient accumulation equals the full-batch loss exactly:
# no mode divides by a micro-batch-local count.
class TokenWeights(Protocol):
    def __call__(
        self, mask: torch.Tensor, *, max_response_length: int, num_sequences: int, num_tokens: int
    ) -> torch.Tensor: ...


LOSS_AGGREGATIONS: Registry[TokenWeights] = Registry("loss aggregation")


@LOSS_AGGREGATIONS.register("token-mean")
def token_mean_weights(
    mask: torch.Tensor, *, max_response_length: int, num_sequences: int, num_tokens: int
) -> torch.Tensor:
    """w_it = m_it / Σ m: every token counts equally (DAPO's token-level loss, Yu et al. 2025, Sec. 3.3)."""
    return mask / max(num_tokens, 1)  # [B, T]


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean_weights(
    mask: torch.Tensor, *, max_response_length: int, num_sequences: int, num_tokens: int
) -> torch.Tensor:
    """w_it = m_it / (|o_i| · N): mean over tokens, then over sequences (GRPO, Shao et al. 2024, Eq. 3)."""
    lengths = mask.sum(dim=-1, keepdim=True).clamp(min=1)  # [B, 1]; empty rows weigh 0, not NaN
    return mask / (lengths * max(num_sequences, 1))  # [B, T]


@LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm_weights(
    mask: torch.Tensor, *, max_response_length: int, num_sequences: int, num_tokens: int
) -> torch.Tensor:
    """w_it = m_it / (L_max · N): token sum over a constant length, mean over sequences.

    Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-like training", Sec. 3.1): dividing by
    the constant max response length instead of |o_i| removes the length bias of GRPO.
    """
    return mask / (max_response_length * max(num_sequences, 1))  # [B, T]


def token_weights(
    response_mask: torch.Tensor,
    mode: str,
    *,
    max_response_length: int,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """w = LOSS_AGGREGATIONS[mode](mask, L_max, N, Σ m), such that the loss is Σ w · per_token_loss.

    `num_sequences` (N, rows including fully-masked ones) and `num_tokens` (Σ m) default to
    this batch's counts; pass the GLOBAL counts of the whole mini-batch (over micro-batches
    and ranks) so that summing the micro-batch losses gives the mini-batch loss exactly.
    Weights come in `dtype`, else the mask's float dtype, else float32. `[B, T] -> [B, T]`.
    """
    if max_response_length < 1:
        raise ValueError(f"max_response_length must be >= 1, got {max_response_length}")
    weigh = LOSS_AGGREGATIONS.get(mode)
    if dtype is None:
        dtype = response_mask.dtype if response_mask.is_floating_point() else torch.float32
    mask = (response_mask != 0).to(dtype)  # [B, T]
    return weigh(
        mask,
        max_response_length=max_response_length,
        num_sequences=mask.shape[0] if num_sequences is None else num_sequences,
        num_tokens=int(mask.sum()) if num_tokens is None else num_tokens,
    )
