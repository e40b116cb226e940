"""Group-relative advantage estimators: one scalar advantage per sampled response.

GRPO has no value network: the baseline of a response is the mean reward of the other
responses to the same prompt. Every estimator maps rewards `[num_groups, group_size]` to
advantages of the same shape; the trainer broadcasts each one over its response's tokens.
Chosen by name (`algorithm.advantage` in the recipe) through `ADVANTAGE_ESTIMATORS`.
An estimator that never divides by a group's std sets `uses_eps = False` on itself: the recipe
then refuses a non-default `algorithm.advantage_eps`, which would do nothing.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from urlvr.registry import Registry


class AdvantageEstimator(Protocol):
    def __call__(self, rewards: torch.Tensor, *, eps: float = 1e-6, **kw: Any) -> torch.Tensor: ...


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


REWARD_RTOL = 1e-5
"""Rewards of one group that agree to within this fraction of the group's largest magnitude are
equal. A certainty score is a float32 mean over the tokens, and the same response scored at two
places of a batch (another micro-batch width, another offset in a packed row) can differ in its
last bits. Compared exactly, such a group counts as varied, and GRPO's division by its std
turns that rounding into advantages of order 1."""


def constant_groups(rewards: torch.Tensor) -> torch.Tensor:
    """`[G, N] -> [G]` bool: every reward of the group equals its first to within `REWARD_RTOL`
    of the group's largest |reward| (exact equality for a group of zeros). A group of one is
    constant. The one rule behind 0 advantages, DAPO's zero-variance filter and
    `reward/zero_variance_group_fraction`."""
    scale = rewards.abs().amax(dim=1, keepdim=True)  # [G, 1]
    return ((rewards - rewards[:, :1]).abs() <= REWARD_RTOL * scale).all(dim=1)


def group_normalized_advantages(
    rewards: torch.Tensor, *, scale_by_std: bool, eps: float = 1e-6
) -> torch.Tensor:
    """A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps) if scale_by_std else r_ij - mean_j r_ij.

    The shared body of GRPO (Shao et al. 2024, DeepSeekMath, Sec. 4.1.2, outcome supervision)
    and Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-like training", Sec. 3.1, which drops
    the std division because it up-weights prompts that are nearly always right or wrong).

    `std` is the UNBIASED sample std within the group (`torch.std`, as verl's GRPO computes it).
    A group of size 1 has no baseline and an undefined std, so its advantage is 0 -- unlike
    verl, which keeps r / (1 + eps) there; a lone sample carries no relative signal.
    A zero-variance group (every sample got the same reward, to within `REWARD_RTOL`:
    `constant_groups`) gets exactly 0 advantages, whatever the rewards are.
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be floating point, got {rewards.dtype}")
    group_size = rewards.shape[1]
    if group_size < 2:
        return torch.zeros_like(rewards)

    centered = rewards - rewards.mean(dim=1, keepdim=True)  # [G, N]
    # Equal rewards can leave their float mean a rounding error away from them (three 0.1s
    # average to 0.10000000000000002), and equal responses can score a few ulps apart; force
    # those groups to exactly 0 rather than dividing rounding noise by eps.
    centered = centered.masked_fill(constant_groups(rewards)[:, None], 0.0)
    if not scale_by_std:
        return centered
    std = rewards.std(dim=1, keepdim=True, unbiased=True)  # [G, 1]
    return centered / (std + eps)  # [G, N]


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(rewards: torch.Tensor, *, eps: float = 1e-6, **kw: Any) -> torch.Tensor:
    """A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps), unbiased std; size-1 groups -> 0.

    GRPO outcome-supervision advantage (Shao et al. 2024, DeepSeekMath, Sec. 4.1.2).
    rewards `[num_groups, group_size]` -> advantages `[num_groups, group_size]`.
    """
    return group_normalized_advantages(rewards, scale_by_std=True, eps=eps)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, *, eps: float = 1e-6, **kw: Any) -> torch.Tensor:
    """A_ij = r_ij - mean_j r_ij (no std scaling; `eps` unused); size-1 groups -> 0.

    Dr.GRPO advantage (Liu et al. 2025, "Understanding R1-Zero-like training", Sec. 3.1).
    rewards `[num_groups, group_size]` -> advantages `[num_groups, group_size]`.
    """
    return group_normalized_advantages(rewards, scale_by_std=False, eps=eps)


dr_grpo_advantages.uses_eps = False


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantages(rewards: torch.Tensor, *, eps: float = 1e-6, **kw: Any) -> torch.Tensor:
    """A_ij = r_ij - (1/(N-1)) Σ_{k≠j} r_ik = N/(N-1) · (r_ij - mean_k r_ik) (`eps` unused); size-1 groups -> 0.

    REINFORCE Leave-One-Out: each response's baseline is the mean reward of the OTHER responses
    to its prompt, so the baseline is independent of the response and the estimate unbiased
    (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"; for LLMs,
    Ahmadian et al. 2024, "Back to Basics", Sec. 3.2). A group of one has no other response,
    hence no baseline: 0. A zero-variance group gets exactly 0.
    rewards `[num_groups, group_size]` -> advantages `[num_groups, group_size]`.
    """
    centered = group_normalized_advantages(rewards, scale_by_std=False, eps=eps)  # [G, N]
    group_size = rewards.shape[1]
    return centered if group_size < 2 else centered * (group_size / (group_size - 1))


rloo_advantages.uses_eps = False
