"""Policy losses as variants: each registered loss is its own recipe section (`algorithm.loss`)
holding its knobs, and maps per-token log-probs to a per-token loss plus the metrics it logs.

    algorithm:
      loss: {name: ppo_clip, clip_eps_high: 0.28}

A new loss (`gspo.py`, `cispo.py`, a plugin's) is one `PolicyLoss` subclass registered under its name;
the loop, the schema, the docs and the error messages pick it up from `POLICY_LOSSES`
(docs/writing-losses.md). Shapes: B responses, T response tokens (right-padded);
`response_mask [B, T]` is 1 (or True) on real response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from urlvr.section import VariantSection, check_variant_name
from urlvr.registry import Registry

# verl clamps log(ratio) to this range before exp() so one wild token cannot overflow the loss.
LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class PolicyLossResult:
    """What every policy loss returns for one micro-batch."""

    per_token_loss: torch.Tensor  # [B, T] loss to minimise; 0 where the mask is 0
    metrics: dict[str, float]  # logged as `actor/<name>`, averaged over micro-batches


class PolicyLoss(VariantSection):
    """Base of a policy loss section: `__call__(logprobs, old_logprobs, advantages, response_mask)`
    with `[B, T]` log-probs under the current and the rollout policy, `[B]` (or `[B, T]`)
    advantages and a `[B, T]` mask, returning a `PolicyLossResult`. The trainer weights the
    per-token loss by the recipe's `algorithm.loss_aggregation` (global normalisers).

    A loss that reads statistics of the CURRENT policy's next-token distribution (entropy, ...)
    names them in `stats()`: the training forward then computes them, with gradient, and the
    trainer passes them as `token_stats={name: [B, T]}`. A loss that needs none keeps the
    four-argument call; the keyword is passed only when `stats()` is not empty.

    `ratio_knobs` names the fields that act through the importance ratio only (clip ranges): in an
    on-policy recipe the ratio is exactly 1, so the recipe refuses a non-default value there.

    `aggregations` names the `algorithm.loss_aggregation` modes the loss's objective is defined
    with (None: any, the loss is a per-token loss whatever the weighting). A recipe that names
    another is refused at load time (under it the trainer would minimise a different objective);
    one that names none gets the first."""

    ratio_knobs: ClassVar[tuple[str, ...]] = ()
    aggregations: ClassVar[tuple[str, ...] | None] = None

    def stats(self) -> tuple[str, ...]:
        """Token statistics (names in `TOKEN_STATS`) the training forward computes for this loss."""
        return ()

    def __call__(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                 response_mask: torch.Tensor) -> PolicyLossResult:
        raise NotImplementedError


POLICY_LOSSES: Registry[type[PolicyLoss]] = Registry("policy loss", check=check_variant_name)


# --------------------------------------------------------------------------- ppo_clip
@dataclass(frozen=True)
class PolicyLossOutput:
    """PPO-clip's per-token loss and its diagnostics (`PPOClipLoss` turns them into metrics)."""

    per_token_loss: torch.Tensor  # [B, T] loss to minimise (-surrogate); 0 where mask == 0
    ratio: torch.Tensor  # [B, T] pi / pi_old; 1 where mask == 0
    clipped: torch.Tensor  # [B, T] bool, the ratio clip was active (masked tokens only)
    dual_clipped: torch.Tensor  # [B, T] bool, the dual clip was active (masked tokens only)


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


@POLICY_LOSSES.register("ppo_clip")
class PPOClipLoss(PolicyLoss):
    """PPO's clipped surrogate (GRPO, Shao et al. 2024, Eq. 3) with DAPO's clip-higher and an
    optional dual clip; logs `clip_fraction`, `dual_clip_fraction`, `ratio_mean/min/max`.
    Defined under every aggregation: GRPO's `seq-mean-token-mean` (Eq. 3), DAPO's `token-mean`
    (Yu et al. 2025, Sec. 3.3) and Dr.GRPO's `seq-mean-token-sum-norm` (Liu et al. 2025, Sec. 3.1)
    all weigh this same per-token surrogate."""

    name: Literal["ppo_clip"] = "ppo_clip"
    ratio_knobs: ClassVar[tuple[str, ...]] = ("clip_eps_low", "clip_eps_high", "dual_clip_c")
    clip_eps_low: float = Field(0.2, ge=0.0, le=1.0)
    """Lower clip range: ratio clipped at 1 - clip_eps_low."""
    clip_eps_high: float = Field(0.2, ge=0.0, le=10.0)
    """Upper clip range: ratio clipped at 1 + clip_eps_high (DAPO's clip-higher uses 0.28)."""
    dual_clip_c: float | None = Field(None, gt=1.0)
    """Dual-clip constant c > 1 bounding the loss for negative advantages; null = off."""

    def __call__(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                 response_mask: torch.Tensor) -> PolicyLossResult:
        out = ppo_clip_loss(logprobs, old_logprobs, advantages, response_mask, clip_eps_low=self.clip_eps_low,
                            clip_eps_high=self.clip_eps_high, dual_clip_c=self.dual_clip_c)
        return PolicyLossResult(out.per_token_loss, policy_loss_metrics(out, response_mask))
