"""Advantage estimators against a plain-Python float64 reference and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from urlvr.registry import UnknownNameError
from urlvr.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    dr_grpo_advantages,
    group_normalized_advantages,
    grpo_advantages,
    rloo_advantages,
)


# --------------------------------------------------------------------------- reference
def reference_advantages(groups: list[list[float]], *, scale_by_std: bool, eps: float) -> list[list[float]]:
    """Loops over lists: (r - mean) / (unbiased std + eps), or r - mean; size-1 groups -> 0."""
    out = []
    for group in groups:
        n = len(group)
        if n < 2:
            out.append([0.0] * n)
            continue
        mean = sum(group) / n
        if all(r == group[0] for r in group):
            out.append([0.0] * n)
            continue
        if not scale_by_std:
            out.append([r - mean for r in group])
            continue
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (n - 1))
        out.append([(r - mean) / (std + eps) for r in group])
    return out


def random_rewards(seed: int, num_groups: int, group_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    continuous = torch.randn(num_groups, group_size, generator=gen, dtype=torch.float64)
    binary = torch.randint(0, 2, (num_groups, group_size), generator=gen).double()
    rewards = torch.where(torch.arange(num_groups).unsqueeze(1) % 2 == 0, continuous, binary)
    rewards[0] = 0.7  # a zero-variance group in every batch
    return rewards


# --------------------------------------------------------------------------- float64 reference
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("group_size", [2, 5, 8])
@pytest.mark.parametrize(
    ("name", "scale_by_std"), [("grpo", True), ("dr_grpo", False)]
)
def test_matches_float64_reference(seed: int, group_size: int, name: str, scale_by_std: bool) -> None:
    rewards = random_rewards(seed, num_groups=7, group_size=group_size)
    eps = 1e-6
    got = ADVANTAGE_ESTIMATORS.get(name)(rewards, eps=eps)
    want = torch.tensor(reference_advantages(rewards.tolist(), scale_by_std=scale_by_std, eps=eps), dtype=torch.float64)
    assert got.shape == rewards.shape and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_float32_rewards_close_to_float64_reference() -> None:
    rewards = random_rewards(5, num_groups=6, group_size=4)
    got = grpo_advantages(rewards.float())
    reference = reference_advantages(rewards.float().double().tolist(), scale_by_std=True, eps=1e-6)
    want = torch.tensor(reference, dtype=torch.float64)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- hand-computed
def test_grpo_hand_computed_binary_group() -> None:
    # mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 1/sqrt(3)  ->  +-0.5 * sqrt(3) = +-0.8660254...
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    half_sqrt3 = math.sqrt(3) / 2
    exact = grpo_advantages(rewards, eps=0.0)
    want = torch.tensor([[half_sqrt3, -half_sqrt3, -half_sqrt3, half_sqrt3]], dtype=torch.float64)
    torch.testing.assert_close(exact, want, rtol=1e-15, atol=1e-15)
    with_eps = grpo_advantages(rewards)  # eps = 1e-6 shrinks it a hair
    assert with_eps[0, 0].item() == pytest.approx(0.5 / (1 / math.sqrt(3) + 1e-6), rel=1e-14)
    assert with_eps[0, 0].item() < half_sqrt3


def test_grpo_uses_unbiased_std() -> None:
    # [0, 2]: mean 1, unbiased std sqrt(2) (biased would be 1, giving +-1)
    got = grpo_advantages(torch.tensor([[0.0, 2.0]], dtype=torch.float64), eps=0.0)
    torch.testing.assert_close(got, torch.tensor([[-1 / math.sqrt(2), 1 / math.sqrt(2)]], dtype=torch.float64))


def test_dr_grpo_hand_computed() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    got = dr_grpo_advantages(rewards)
    assert torch.equal(got, torch.tensor([[0.5, -0.5, -0.5, 0.5], [2.0, -1.0, -1.0, 0.0]], dtype=torch.float64))


# --------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_variance_groups_get_exactly_zero(name: str, dtype: torch.dtype) -> None:
    # three 0.1s average to 0.10000000000000002 in float64: the estimator must still return 0
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=dtype)
    got = ADVANTAGE_ESTIMATORS.get(name)(rewards)
    assert torch.equal(got[:3], torch.zeros(3, 3, dtype=dtype))
    assert (got[3] != 0).all()


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_group_size_one_gives_zero(name: str) -> None:
    got = ADVANTAGE_ESTIMATORS.get(name)(torch.tensor([[3.0], [-1.0]]))
    assert torch.equal(got, torch.zeros(2, 1))


def test_advantages_sum_to_zero_per_group() -> None:
    rewards = random_rewards(11, num_groups=5, group_size=6)
    for name in ADVANTAGE_ESTIMATORS.names():
        sums = ADVANTAGE_ESTIMATORS.get(name)(rewards).sum(dim=1)
        torch.testing.assert_close(sums, torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_registered_estimators_are_the_generic_function() -> None:
    rewards = random_rewards(3, num_groups=4, group_size=4)
    generic = group_normalized_advantages(rewards, scale_by_std=True, eps=1e-4)
    assert torch.equal(grpo_advantages(rewards, eps=1e-4), generic)
    assert torch.equal(dr_grpo_advantages(rewards), group_normalized_advantages(rewards, scale_by_std=False))


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="num_groups, group_size"):
        grpo_advantages(torch.zeros(8))
    with pytest.raises(TypeError, match="floating"):
        grpo_advantages(torch.zeros(2, 4, dtype=torch.long))


# --------------------------------------------------------------------------- registry
def test_registry_names_duplicates_and_suggestions() -> None:
    assert ADVANTAGE_ESTIMATORS.names() == ["dr_grpo", "grpo", "rloo"]
    with pytest.raises(ValueError, match="already registered"):
        ADVANTAGE_ESTIMATORS.register("grpo")(lambda rewards, **kw: rewards)
    assert ADVANTAGE_ESTIMATORS.get("grpo") is grpo_advantages  # the duplicate did not replace it
    with pytest.raises(UnknownNameError, match="did you mean 'dr_grpo'"):
        ADVANTAGE_ESTIMATORS.get("drgrpo")


# --------------------------------------------------------------------------- RLOO
def reference_rloo(groups: list[list[float]]) -> list[list[float]]:
    """Loops over lists: A_i = r_i - mean_{j != i} r_j (Kool et al. 2019); size-1 groups -> 0."""
    out = []
    for group in groups:
        n = len(group)
        if n < 2:
            out.append([0.0] * n)
            continue
        out.append([r - sum(group[j] for j in range(n) if j != i) / (n - 1) for i, r in enumerate(group)])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("group_size", [1, 2, 5, 8])
def test_rloo_matches_float64_reference(seed: int, group_size: int) -> None:
    rewards = random_rewards(seed, num_groups=7, group_size=group_size)  # group 0 has equal rewards
    got = rloo_advantages(rewards)
    want = torch.tensor(reference_rloo(rewards.tolist()), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[0], torch.zeros(group_size, dtype=torch.float64))  # all-equal rewards: exactly 0
    assert ADVANTAGE_ESTIMATORS.get("rloo") is rloo_advantages


def test_rloo_hand_computed() -> None:
    # [1, 0, 0, 1]: 1 - 1/3 = 2/3, 0 - 2/3 = -2/3; [3, 1]: 3 - 1 = 2, 1 - 3 = -2
    got = rloo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]], dtype=torch.float64))
    assert torch.equal(rloo_advantages(torch.tensor([[3.0, 1.0]])), torch.tensor([[2.0, -2.0]]))


def test_rewards_equal_to_float_rounding_make_a_constant_group():
    """The same response scored a few float32 ulps apart (breaker's case: self-certainty of 4
    identical samples in a packed row) must give 0 advantages, not noise / std of order 1; a
    real difference, however small in absolute terms, still counts (the tolerance is relative)."""
    from urlvr.algorithms.advantages import constant_groups

    rounding = torch.tensor([[8.615926743, 8.615926743, 8.615926743, 8.615928650]], dtype=torch.float32)
    for name in ("grpo", "dr_grpo", "rloo"):
        assert torch.equal(ADVANTAGE_ESTIMATORS.get(name)(rounding), torch.zeros_like(rounding)), name
    tiny_but_real = torch.tensor([[1e-30, 2e-30, 1e-30, 1e-30]], dtype=torch.float64)
    assert not constant_groups(tiny_but_real)[0]
    assert ADVANTAGE_ESTIMATORS.get("dr_grpo")(tiny_but_real).abs().max() > 0  # not zeroed as constant
    assert constant_groups(torch.zeros(2, 3)).all() and constant_groups(torch.tensor([[5.0]])).all()
    assert not constant_groups(torch.tensor([[1.0, 1.001]])).any()
