"""GSPO, GSPO-token and CISPO against plain-Python float64 loops written from their papers'
formulas (never calling the functions under test), with padding, empty responses and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from urlvr.algorithms.cispo import CISPOLoss, cispo_loss
from urlvr.algorithms.gspo import GSPOLoss, GSPOTokenLoss, gspo_loss
from urlvr.algorithms.losses import LOSS_AGGREGATIONS
from urlvr.algorithms.policy_losses import POLICY_LOSSES, ppo_clip_loss
from urlvr.recipe import RecipeError, load_recipe

F64 = torch.float64


def ragged_batch(seed: int, batch: int = 6, length: int = 7, scale: float = 0.01) -> dict:
    """float64 log-probs with small per-token moves (GSPO's sequence ratios straddle 1 ± 4e-4 at
    scale 1e-3), a ragged mask with one empty row, NaN on padding, advantages of both signs and a 0."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen, dtype=F64) * 3
    logprobs = old + torch.randn(batch, length, generator=gen, dtype=F64) * scale
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[seed % batch] = 0
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    logprobs = logprobs.masked_fill(mask == 0, float("nan"))  # garbage on padding
    signs = torch.tensor([1.0, -1.0], dtype=F64).repeat(batch)[:batch]
    advantages = torch.randn(batch, generator=gen, dtype=F64).abs() * signs
    advantages[(seed + 1) % batch] = 0.0
    return {"logprobs": logprobs, "old": old, "mask": mask, "advantages": advantages}


# --------------------------------------------------------------------------- GSPO references
def reference_gspo(logprobs, old, advantages, mask, lo, hi):
    """Zheng et al. 2025, Eq. 5-7: s_i = exp(mean_t (log π - log π_old)); L_i = -min(s_i A_i, clip(s_i) A_i),
    carried by each token of response i; also s_i, whether the clip is active, and the gradient
    dL_i/d log π_it = -A_i s_i / |y_i| where the clip is inactive (Eq. 11), else 0."""
    loss, ratios, clipped, grad = [], [], [], []
    for i, row in enumerate(logprobs):
        valid = [t for t in range(len(row)) if mask[i][t]]
        n = len(valid)
        s = math.exp(max(-20.0, min(20.0, sum(row[t] - old[i][t] for t in valid) / n))) if n else 1.0
        a = advantages[i]
        s_clip = min(max(s, 1.0 - lo), 1.0 + hi)
        value = -min(s * a, s_clip * a)
        was_clipped = -s_clip * a > -s * a
        loss.append([value if mask[i][t] else 0.0 for t in range(len(row))])
        clipped.append([bool(was_clipped and mask[i][t]) for t in range(len(row))])
        grad.append([(0.0 if was_clipped else -a * s / n) if mask[i][t] else 0.0 for t in range(len(row))])
        ratios.append(s)
    return loss, ratios, clipped, grad


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("scale", [1e-3, 0.3])
def test_gspo_matches_float64_reference(seed: int, scale: float) -> None:
    b = ragged_batch(seed, scale=scale)
    lo, hi = 3e-4, 4e-4
    logprobs = b["logprobs"].clone().requires_grad_(True)
    out = gspo_loss(logprobs, b["old"], b["advantages"], b["mask"], clip_eps_low=lo, clip_eps_high=hi)
    want_loss, want_ratio, want_clipped, want_grad = reference_gspo(
        b["logprobs"].tolist(), b["old"].tolist(), b["advantages"].tolist(), b["mask"].tolist(), lo, hi)
    torch.testing.assert_close(out.per_token_loss.detach(), torch.tensor(want_loss, dtype=F64), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out.sequence_ratio, torch.tensor(want_ratio, dtype=F64), rtol=1e-12, atol=0)
    assert out.clipped.tolist() == want_clipped
    assert not all(any(row) for row in want_clipped)  # the empty and the A = 0 response are never clipped
    assert scale < 0.1 or any(any(row) for row in want_clipped)
    # Σ_t L_i/|y_i| summed over responses: the gradient of the sequence objective (1 per response)
    lengths = b["mask"].sum(-1, keepdim=True).clamp(min=1)
    (out.per_token_loss / lengths).sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor(want_grad, dtype=F64), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_token_equals_gspo_with_one_advantage_per_response(seed: int) -> None:
    b = ragged_batch(seed, scale=1e-3)
    grads, losses = [], []
    for token_level in (False, True):
        logprobs = b["logprobs"].clone().requires_grad_(True)
        out = gspo_loss(logprobs, b["old"], b["advantages"], b["mask"], clip_eps_low=3e-4, clip_eps_high=4e-4,
                        token_level=token_level)
        weights = b["mask"] / b["mask"].sum(-1, keepdim=True).clamp(min=1)  # seq-mean-token-mean (x B)
        (weights * out.per_token_loss).sum().backward()
        grads.append(logprobs.grad)
        losses.append(out.per_token_loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-15)


def test_gspo_token_with_per_token_advantages_matches_reference() -> None:
    """Eq. 13/17: s_it = sg[s_i] π_t/sg[π_t]; its loss -min(s_it A_it, clip(s_it) A_it) and gradient
    d/d log π_it = -A_it s_i where that token's clip is inactive, else 0 (per token, no 1/|y|)."""
    b = ragged_batch(5, scale=1e-3)
    gen = torch.Generator().manual_seed(9)
    adv = torch.randn(b["mask"].shape, generator=gen, dtype=F64)
    logprobs = b["logprobs"].clone().requires_grad_(True)
    out = gspo_loss(logprobs, b["old"], adv, b["mask"], clip_eps_low=3e-4, clip_eps_high=4e-4, token_level=True)
    out.per_token_loss.sum().backward()
    mask, lp, old = b["mask"].tolist(), b["logprobs"].tolist(), b["old"].tolist()
    for i in range(len(mask)):
        valid = [t for t in range(len(mask[i])) if mask[i][t]]
        s = math.exp(sum(lp[i][t] - old[i][t] for t in valid) / len(valid)) if valid else 1.0
        for t in range(len(mask[i])):
            a = float(adv[i, t])
            s_clip = min(max(s, 1 - 3e-4), 1 + 4e-4)
            want = -min(s * a, s_clip * a) if mask[i][t] else 0.0
            want_grad = (0.0 if -s_clip * a > -s * a else -a * s) if mask[i][t] else 0.0
            assert float(out.per_token_loss.detach()[i, t]) == pytest.approx(want, rel=1e-12, abs=1e-15)
            assert float(logprobs.grad[i, t]) == pytest.approx(want_grad, rel=1e-10, abs=1e-15)
    with pytest.raises(ValueError, match="one advantage per response"):
        gspo_loss(b["logprobs"], b["old"], adv, b["mask"], clip_eps_low=0.1, clip_eps_high=0.1)


def test_gspo_section_metrics_hand_computed() -> None:
    # response 0: log-ratios 0.1, 0.3 -> s = e^0.2, A = 1 -> clipped at 1.1; response 1: s = 1; response 2: empty
    old = torch.zeros(3, 2, dtype=F64)
    logprobs = torch.tensor([[0.1, 0.3], [0.0, 5.0], [float("nan"), float("nan")]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]])
    result = GSPOLoss(clip_eps_low=0.1, clip_eps_high=0.1)(logprobs, old, torch.tensor([1.0, -1.0, 2.0], dtype=F64), mask)
    torch.testing.assert_close(result.per_token_loss, torch.tensor([[-1.1, -1.1], [1.0, 0.0], [0.0, 0.0]], dtype=F64))
    assert result.metrics["clip_fraction"] == 0.5 and result.metrics["token_clip_fraction"] == 2 / 3
    assert result.metrics["ratio_max"] == pytest.approx(math.exp(0.2)) and result.metrics["ratio_min"] == 1.0
    assert result.metrics["ratio_mean"] == pytest.approx((math.exp(0.2) + 1) / 2)
    empty = GSPOTokenLoss()(logprobs, old, torch.ones(3, dtype=F64), torch.zeros(3, 2))
    assert empty.metrics["clip_fraction"] == 0.0 and math.isnan(empty.metrics["ratio_mean"])
    assert torch.equal(empty.per_token_loss, torch.zeros(3, 2, dtype=F64))


# --------------------------------------------------------------------------- CISPO
def reference_cispo(logprobs, old, advantages, mask, lo, hi):
    """MiniMax-M1 Eq. 4-5: w = clip(ρ, 1-ε_low, 1+ε_high) (no lower bound when ε_low is None);
    L = -w·A·log π; gradient d L / d log π = -w·A on every response token (w is a constant)."""
    loss, grad, clipped = [], [], []
    for i, row in enumerate(logprobs):
        lrow, grow, crow = [], [], []
        for t, lp in enumerate(row):
            if not mask[i][t]:
                lrow.append(0.0), grow.append(0.0), crow.append(False)
                continue
            rho = math.exp(max(-20.0, min(20.0, lp - old[i][t])))
            w = min(rho, 1.0 + hi) if lo is None else min(max(rho, 1.0 - lo), 1.0 + hi)
            lrow.append(-w * advantages[i] * lp), grow.append(-w * advantages[i]), crow.append(w != rho)
        loss.append(lrow), grad.append(grow), clipped.append(crow)
    return loss, grad, clipped


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("clip_eps_low", [None, 0.2])
def test_cispo_matches_float64_reference_and_its_stop_gradient(seed: int, clip_eps_low: float | None) -> None:
    b = ragged_batch(seed, scale=0.8)
    logprobs = b["logprobs"].clone().requires_grad_(True)
    out = cispo_loss(logprobs, b["old"], b["advantages"], b["mask"], clip_eps_low=clip_eps_low, clip_eps_high=0.28)
    out.per_token_loss.sum().backward()
    want_loss, want_grad, want_clipped = reference_cispo(
        b["logprobs"].tolist(), b["old"].tolist(), b["advantages"].tolist(), b["mask"].tolist(), clip_eps_low, 0.28)
    torch.testing.assert_close(out.per_token_loss.detach(), torch.tensor(want_loss, dtype=F64), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(logprobs.grad, torch.tensor(want_grad, dtype=F64), rtol=1e-12, atol=1e-15)
    assert out.clipped.tolist() == want_clipped and any(any(r) for r in want_clipped)
    # no token leaves the gradient: every response token with A != 0 has a non-zero gradient
    live = (b["mask"] == 1) & (b["advantages"].unsqueeze(-1) != 0)
    assert (logprobs.grad[live] != 0).all()


def test_cispo_on_policy_gradient_equals_ppo_clip() -> None:
    b = ragged_batch(7)
    old = torch.where(b["mask"] == 1, b["logprobs"], b["old"])
    grads = []
    for fn in (lambda lp: cispo_loss(lp, old, b["advantages"], b["mask"], clip_eps_low=None, clip_eps_high=0.28),
               lambda lp: ppo_clip_loss(lp, old, b["advantages"], b["mask"], clip_eps_low=0.2, clip_eps_high=0.28)):
        logprobs = old.clone().requires_grad_(True)
        fn(logprobs).per_token_loss.sum().backward()
        grads.append(logprobs.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)


def test_cispo_section_metrics_hand_computed() -> None:
    old = torch.zeros(2, 2, dtype=F64)
    logprobs = torch.tensor([[math.log(2.0), math.log(0.5)], [0.0, float("nan")]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]])
    result = CISPOLoss(clip_eps_high=0.28)(logprobs, old, torch.tensor([1.0, 1.0], dtype=F64), mask)
    # weights 1.28 (2 clipped), 0.5 (no lower bound), 1
    torch.testing.assert_close(result.per_token_loss,
                               torch.tensor([[-1.28 * math.log(2), 0.5 * math.log(2)], [0.0, 0.0]], dtype=F64))
    assert result.metrics["clip_fraction"] == pytest.approx(1 / 3)
    assert (result.metrics["ratio_min"], result.metrics["ratio_max"]) == pytest.approx((0.5, 2.0))
    bounded = CISPOLoss(clip_eps_low=0.2)(logprobs, old, torch.tensor([1.0, 1.0], dtype=F64), mask)
    assert bounded.metrics["clip_fraction"] == pytest.approx(2 / 3)  # 0.5 now clipped at 0.8


# --------------------------------------------------------------------------- sections
def test_sections_registered_with_the_papers_defaults() -> None:
    assert {"gspo", "gspo_token", "cispo", "ppo_clip"} <= set(POLICY_LOSSES.names())
    gspo = load_recipe({"algorithm": {"loss": "gspo"}}).algorithm.loss
    assert (gspo.clip_eps_low, gspo.clip_eps_high, gspo.stats()) == (3e-4, 4e-4, ())
    off_policy = {"trainer": {"ppo_epochs": 2}}  # a clip range acts only where the ratio leaves 1
    cispo = load_recipe({"algorithm": {"loss": {"name": "cispo", "clip_eps_high": 2.0}}, **off_policy}).algorithm.loss
    assert (cispo.clip_eps_low, cispo.clip_eps_high) == (None, 2.0)
    assert type(load_recipe({"algorithm": {"loss": "gspo_token"}}).algorithm.loss) is GSPOTokenLoss
    with pytest.raises(RecipeError, match=r"algorithm\.loss\.clip_eps_low"):
        load_recipe({"algorithm": {"loss": {"name": "gspo", "clip_eps_low": -1}}})


# --------------------------------------------------------------------------- aggregation
def test_each_loss_declares_registered_aggregations_and_gets_its_own_when_none_is_written() -> None:
    declared = {name: POLICY_LOSSES.get(name).aggregations for name in ("ppo_clip", "gspo", "gspo_token", "cispo")}
    assert declared == {"ppo_clip": None, "gspo": ("seq-mean-token-mean",), "gspo_token": ("seq-mean-token-mean",),
                        "cispo": ("token-mean",)}
    for name in POLICY_LOSSES.names():
        assert set(POLICY_LOSSES.get(name).aggregations or ()) <= set(LOSS_AGGREGATIONS.names()), name
    picked = {name: load_recipe({"algorithm": {"loss": name}}).algorithm.loss_aggregation for name in declared}
    assert picked == {"ppo_clip": "token-mean", "gspo": "seq-mean-token-mean", "gspo_token": "seq-mean-token-mean",
                      "cispo": "token-mean"}
    written = load_recipe({"algorithm": {"loss": "ppo_clip", "loss_aggregation": "seq-mean-token-sum-norm"}})
    assert written.algorithm.loss_aggregation == "seq-mean-token-sum-norm"  # ppo_clip takes any mode
