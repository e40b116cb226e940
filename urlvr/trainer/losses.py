"""Policy losses, KL estimators, entropy and loss aggregation, as pure tensor functions.

Shapes: B responses in the (micro-)batch, T response tokens (right-padded), V vocabulary.
`response_mask [B, T]` is 1 (or True) on real response tokens. Each swappable part is chosen by
name from the recipe's `algorithm` section through a registry:
`POLICY_LOSSES`, `KL_ESTIMATORS`, `LOSS_AGGREGATIONS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from urlvr.registry import Registry

# verl clamps log(ratio) to this range before exp() so one wild token cannot overflow the loss.
LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------- policy loss
@dataclass(frozen=True)
class PolicyLossOutput:
    """Per-token policy loss and the diagnostics the trainer logs."""

    per_token_loss: torch.Tensor  # [B, T] loss to minimise (-surrogate); 0 where mask == 0
    ratio: torch.Tensor  # [B, T] pi / pi_old; 1 where mask == 0
    clipped: torch.Tensor  # [B, T] bool, the ratio clip was active (masked tokens only)
    dual_clipped: torch.Tensor  # [B, T] bool, the dual clip was active (masked tokens only)


class PolicyLoss(Protocol):
    def __call__(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        *,
        clip_eps_low: float,
        clip_eps_high: float,
        dual_clip_c: float | None = None,
    ) -> PolicyLossOutput: ...


POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip_c: float | None = None,
) -> PolicyLossOutput:
    """L = max(-A·ρ, -A·clip(ρ, 1-ε_low, 1+ε_high)); if A<0 and c: L = min(L, -c·A); ρ = exp(logπ - logπ_old).

    PPO's clipped surrogate as GRPO uses it (Shao et al. 2024, DeepSeekMath, Eq. 3), with
    DAPO's decoupled clip-higher ε_low ≠ ε_high (Yu et al. 2025, Sec. 3.1) and the optional
    dual clip of Ye et al. 2020 ("Mastering Complex Control in MOBA Games with Deep RL"),
    which for A < 0 bounds the loss by -c·A (c > 1) so a huge ratio on a bad token cannot
    produce an unbounded step. On response tokens it follows verl's
    `compute_policy_loss_vanilla` exactly:
    log ρ clamped to ±20 before exp; `clipped` = (-A·clip(ρ) > -A·ρ); `dual_clipped` =
    (A < 0) & (max(-A·ρ, -A·clip(ρ)) > -c·A).

    `advantages` is `[B]` (one per response, broadcast over tokens) or `[B, T]`.
    Where `response_mask` is 0, `per_token_loss` is 0, `ratio` is 1 and the flags are False,
    so garbage (even NaN) log-probs on padding reach neither the loss nor its gradient.
    """
    if dual_clip_c is not None and not dual_clip_c > 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (got {dual_clip_c}); use None to turn it off")
    if advantages.ndim == 1:
        advantages = advantages.unsqueeze(-1)  # [B, 1]
    mask = response_mask.bool()  # [B, T]

    # Padding gets log-ratio 0 through where() (not a multiply), so NaN/inf log-probs there
    # reach neither the loss nor its gradient.
    log_ratio = torch.where(mask, logprobs - old_logprobs, 0.0)  # [B, T]
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)  # [B, T]
    unclipped_loss = -advantages * ratio  # [B, T]
    clipped_loss = -advantages * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)  # [B, T]
    loss = torch.maximum(unclipped_loss, clipped_loss)  # [B, T]
    clipped = clipped_loss > unclipped_loss  # [B, T]

    if dual_clip_c is None:
        dual_clipped = torch.zeros_like(mask)
    else:
        dual_bound = -advantages * dual_clip_c  # [B, 1] or [B, T]
        negative = advantages < 0
        dual_clipped = negative & (loss > dual_bound)  # [B, T]
        loss = torch.where(negative, torch.minimum(loss, dual_bound), loss)

    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return PolicyLossOutput(
        per_token_loss=torch.where(mask, loss, zero),
        ratio=ratio,
        clipped=clipped & mask,
        dual_clipped=dual_clipped.expand_as(mask) & mask,
    )


def policy_loss_metrics(out: PolicyLossOutput, mask: torch.Tensor) -> dict[str, float]:
    """clip_fraction = Σ clipped / Σ mask; dual_clip_fraction likewise; ratio mean/min/max over masked tokens.

    With no masked token the fractions are 0.0 and the ratio statistics NaN (undefined).
    """
    mask = mask.bool()  # [B, T]
    num_tokens = int(mask.sum())
    if num_tokens == 0:
        nan = float("nan")
        return {"clip_fraction": 0.0, "dual_clip_fraction": 0.0,
                "ratio_mean": nan, "ratio_min": nan, "ratio_max": nan}
    ratio = out.ratio.detach()[mask].double()  # [num_tokens]
    return {
        "clip_fraction": int((out.clipped & mask).sum()) / num_tokens,
        "dual_clip_fraction": int((out.dual_clipped & mask).sum()) / num_tokens,
        "ratio_mean": float(ratio.mean()),
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
    }


# --------------------------------------------------------------------------- KL to reference
KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KLEstimator] = Registry("kl estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log π - log π_ref: unbiased for KL(π‖π_ref) under samples from π, high variance, can be < 0.

    Schulman, "Approximating KL divergence" (2020 blog). `[B, T], [B, T] -> [B, T]`.
    """
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π - log π_ref)²: biased, low variance, ≥ 0.

    Schulman, "Approximating KL divergence" (2020 blog). `[B, T], [B, T] -> [B, T]`.
    """
    return 0.5 * (logprobs - ref_logprobs).square()


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(log π_ref - log π) - (log π_ref - log π) - 1: unbiased, low variance, ≥ 0.

    Schulman, "Approximating KL divergence" (2020 blog); the estimator GRPO uses
    (Shao et al. 2024, DeepSeekMath, Eq. 4). Unclamped, unlike verl's `low_var_kl`.
    `[B, T], [B, T] -> [B, T]`.
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


# --------------------------------------------------------------------------- entropy
def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = -Σ_v p_v log p_v with log p = z - logsumexp(z); `[..., V] -> [...]`.

    Computed in at least float32 (bf16/fp16 logits are upcast; float64 stays float64).
    Vocabulary entries with logit -inf (p = 0) contribute 0, not NaN, and so does their gradient
    (the log is masked before the product: masking the product would send 0 * -inf back).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_probs = torch.log_softmax(logits.to(dtype), dim=-1)  # [..., V]
    probs = log_probs.exp()  # [..., V]
    return -(probs * torch.where(probs > 0, log_probs, 0.0)).sum(dim=-1)  # [...]


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


def aggregate_loss(
    per_token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str,
    *,
    max_response_length: int,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """loss = Σ_it w_it · ℓ_it with w = token_weights(mask, mode, ...); `[B, T] -> []`.

    Masked-out entries of `per_token_loss` are ignored even if they are NaN or inf.
    """
    weights = token_weights(
        response_mask,
        mode,
        max_response_length=max_response_length,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        dtype=per_token_loss.dtype,
    )  # [B, T]
    losses = per_token_loss.masked_fill(response_mask == 0, 0.0)  # [B, T]
    return (weights * losses).sum()
