"""Token filters for entropy control (top-q entropy tokens, Clip-Cov, KL-Cov) against plain-Python
float64 loops from their papers' formulas, with padding and empty responses; gradients where the
filter is about the gradient; and a training step that computes exactly what the filter declares."""

from __future__ import annotations

import math

import pytest
import torch

import urlvr
from conftest import small_run_recipe
from urlvr.algorithms.token_filters import (
    TOKEN_FILTERS,
    ClipCovFilter,
    HighEntropyFilter,
    KLCovFilter,
    clip_cov_mask,
    token_covariance,
    top_fraction_mask,
    top_k_mask,
)
from urlvr.recipe import load_recipe

F64 = torch.float64


def batch(seed: int, rows: int = 5, length: int = 8) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (rows,), generator=gen)
    lengths[seed % rows] = 0  # an empty response
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    old = -torch.rand(rows, length, generator=gen, dtype=F64) * 4
    entropy = torch.rand(rows, length, generator=gen, dtype=F64) * 3
    advantages = torch.randn(rows, generator=gen, dtype=F64) * 2
    garbage = torch.full((rows, length), float("nan"), dtype=F64)
    return {"mask": mask, "old": torch.where(mask == 1, old, garbage), "entropy": torch.where(mask == 1, entropy, garbage),
            "advantages": advantages}


def valid(mask):
    return [(i, t) for i, row in enumerate(mask.tolist()) for t, m in enumerate(row) if m]


# --------------------------------------------------------------------------- top-q entropy
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fraction", [0.2, 0.5, 1.0, 1e-6])
def test_top_fraction_matches_reference(seed: int, fraction: float) -> None:
    b = batch(seed)
    cells = valid(b["mask"])
    values = sorted((float(b["entropy"][c]) for c in cells), reverse=True)
    k = math.ceil(fraction * len(values))  # Wang et al.: the top-ρ quantile of the batch's token entropies
    threshold = values[k - 1]
    want = [[(i, t) in cells and float(b["entropy"][i, t]) >= threshold for t in range(8)] for i in range(5)]
    assert top_fraction_mask(b["entropy"], b["mask"], fraction).tolist() == want
    assert sum(map(sum, want)) == k  # continuous entropies: no ties


def test_top_fraction_without_tokens_keeps_nothing() -> None:
    assert not top_fraction_mask(torch.ones(2, 3), torch.zeros(2, 3), 0.2).any()


def test_high_entropy_filter_zeroes_loss_and_gradient_of_the_rest() -> None:
    b = batch(3)
    f = HighEntropyFilter(top_fraction=0.25)
    sel = f.select(b["old"], b["advantages"], b["mask"], {"entropy": b["entropy"]}, torch.Generator())
    assert f.stats() == ("entropy",)
    assert sel.metrics["selected_fraction"] == pytest.approx(math.ceil(0.25 * int(b["mask"].sum())) / int(b["mask"].sum()))
    loss_in = torch.where(b["mask"] == 1, torch.randn(5, 8, dtype=F64), 0.0).requires_grad_(True)
    out = f.apply(loss_in, b["old"], b["old"], sel.selected)
    out.sum().backward()
    assert torch.equal(out.detach(), torch.where(sel.selected, loss_in.detach(), 0.0))
    assert torch.equal(loss_in.grad, sel.selected.double())


# --------------------------------------------------------------------------- covariance
@pytest.mark.parametrize("seed", [0, 1, 4])
def test_covariance_matches_reference(seed: int) -> None:
    b = batch(seed)
    cells = valid(b["mask"])
    n = len(cells)
    mean_lp = sum(float(b["old"][c]) for c in cells) / n
    mean_a = sum(float(b["advantages"][c[0]]) for c in cells) / n
    got = token_covariance(b["old"], b["advantages"], b["mask"])
    for i in range(5):
        for t in range(8):
            want = (float(b["old"][i, t]) - mean_lp) * (float(b["advantages"][i]) - mean_a) if (i, t) in cells else 0.0
            assert float(got[i, t]) == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert not token_covariance(b["old"], b["advantages"], torch.zeros(5, 8)).any()  # no token: all 0, no NaN


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_cov_draws_floor_r_n_tokens_from_the_band(seed: int) -> None:
    b = batch(seed, rows=6, length=30)
    cov = token_covariance(b["old"], b["advantages"], b["mask"])
    cells = valid(b["mask"])
    band = {c for c in cells if 0.1 <= float(cov[c]) <= 2.0}  # Cui et al.: ω_low ≤ Cov ≤ ω_high
    fraction = 0.1
    want_count = min(math.floor(fraction * len(cells)), len(band))
    chosen = clip_cov_mask(cov, b["mask"], fraction, 0.1, 2.0, torch.Generator().manual_seed(seed))
    picked = {(i, t) for i, t in zip(*torch.nonzero(chosen, as_tuple=True))}
    picked = {(int(i), int(t)) for i, t in picked}
    assert len(picked) == want_count > 0 and picked <= band
    again = clip_cov_mask(cov, b["mask"], fraction, 0.1, 2.0, torch.Generator().manual_seed(seed))
    assert torch.equal(chosen, again)  # reproducible from the seed
    assert not clip_cov_mask(cov, b["mask"], 1e-6, 0.1, 2.0, torch.Generator()).any()  # ⌊r·N⌋ = 0


def test_clip_cov_detaches_the_gradient_of_the_selected_tokens_only() -> None:
    b = batch(2, rows=6, length=30)
    f = ClipCovFilter(fraction=0.05, cov_low=-100.0, cov_high=100.0)
    sel = f.select(b["old"], b["advantages"], b["mask"], {}, torch.Generator().manual_seed(0))
    assert sel.selected.any() and {"cov_mean", "cov_max", "cov_selected_mean", "selected_fraction"} <= set(sel.metrics)
    loss_in = torch.where(b["mask"] == 1, torch.randn(6, 30, dtype=F64), 0.0).requires_grad_(True)
    out = f.apply(loss_in, b["old"], b["old"], sel.selected)
    out.sum().backward()
    assert torch.equal(out.detach(), loss_in.detach())  # the value is kept
    assert torch.equal(loss_in.grad, (~sel.selected).double())


# --------------------------------------------------------------------------- KL-Cov
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_matches_reference(seed: int) -> None:
    b = batch(seed, rows=6, length=30)
    cov = token_covariance(b["old"], b["advantages"], b["mask"])
    cells = valid(b["mask"])
    count = math.floor(0.05 * len(cells))  # Cui et al.: the top k·N covariance tokens
    want = set(sorted(cells, key=lambda c: float(cov[c]), reverse=True)[:count])
    got = top_k_mask(cov, b["mask"], 0.05)
    assert {(int(i), int(t)) for i, t in zip(*torch.nonzero(got, as_tuple=True))} == want and count > 0


def test_kl_cov_adds_coef_abs_log_ratio_on_the_selected_tokens() -> None:
    b = batch(5, rows=6, length=30)
    f = KLCovFilter(fraction=0.1, coef=0.5)
    sel = f.select(b["old"], b["advantages"], b["mask"], {}, torch.Generator())
    gen = torch.Generator().manual_seed(1)
    moved = b["old"] + torch.randn(6, 30, generator=gen, dtype=F64) * 0.1
    logprobs = moved.clone().requires_grad_(True)
    base = torch.where(b["mask"] == 1, torch.randn(6, 30, generator=gen, dtype=F64), 0.0)
    out = f.apply(base, logprobs, b["old"], sel.selected)
    out.sum().backward()
    for i in range(6):
        for t in range(30):
            diff = float(moved[i, t]) - float(b["old"][i, t]) if b["mask"][i, t] else 0.0
            on = bool(sel.selected[i, t])
            assert float(out.detach()[i, t]) == pytest.approx(float(base[i, t]) + (0.5 * abs(diff) if on else 0.0), abs=1e-14)
            assert float(logprobs.grad[i, t]) == (0.5 * math.copysign(1.0, diff) if on else 0.0)


def test_registry_and_sections() -> None:
    assert TOKEN_FILTERS.names() == ["clip_cov", "high_entropy", "kl_cov", "none"]
    r = load_recipe({"algorithm": {"token_filter": "high_entropy"}})
    assert r.algorithm.token_filter.top_fraction == 0.2
    assert (ClipCovFilter().fraction, ClipCovFilter().cov_low, ClipCovFilter().cov_high) == (2e-4, 1.0, 5.0)
    assert (KLCovFilter().fraction, KLCovFilter().coef) == (2e-3, 1.0)


# --------------------------------------------------------------------------- in the step
SHORT = {"terms": [{"name": "test_short_response"}], "oracle": "ground_truth"}


@pytest.mark.parametrize("token_filter", [{"name": "high_entropy", "top_fraction": 0.5},
                                          {"name": "clip_cov", "fraction": 0.05, "cov_low": -10, "cov_high": 10}])
def test_filters_train_and_log(random_tiny_model, tmp_path, token_filter) -> None:
    recipe = small_run_recipe(random_tiny_model[0], tmp_path / "run", plugins=["reward_plugins"], reward=SHORT,
                              algorithm={"token_filter": token_filter}, trainer={"total_steps": 1},
                              dynamics={"token_metrics": []}, collapse={"detectors": []})
    metrics = urlvr.train(recipe).metrics[0]
    assert 0.0 < metrics["actor/token_filter/selected_fraction"] <= 0.5 + 1e-9
    assert metrics["loss/policy"] == metrics["loss/policy"]  # not NaN


def test_a_loss_reads_the_statistics_it_declares(random_tiny_model, tmp_path) -> None:
    recipe = small_run_recipe(random_tiny_model[0], tmp_path / "run", plugins=["reward_plugins", "step_plugins"],
                              reward=SHORT, algorithm={"loss": "test_entropy_weighted_pg"}, trainer={"total_steps": 1})
    metrics = urlvr.train(recipe).metrics[0]
    assert metrics["actor/entropy_seen_mean"] > 0 and metrics["actor/entropy_has_grad"] == 1.0


def test_selection_does_not_depend_on_micro_batching(random_tiny_model, tmp_path) -> None:
    """The quantile is taken over the mini-batch, not each micro-batch: micro-batches of 2 and 16
    rows give the same loss and gradient norm."""
    runs = []
    for micro in (16, 2):
        recipe = small_run_recipe(random_tiny_model[0], tmp_path / f"micro{micro}", plugins=["reward_plugins"],
                                  reward=SHORT, algorithm={"token_filter": {"name": "high_entropy", "top_fraction": 0.3}},
                                  trainer={"total_steps": 1, "micro_batch_size": micro})
        runs.append(urlvr.train(recipe).metrics[0])
    for key in ("loss/policy", "actor/grad_norm", "actor/token_filter/entropy_threshold"):
        assert runs[0][key] == pytest.approx(runs[1][key], rel=1e-5), key


MIXED = {"group_size": 4, "max_new_tokens": 12, "stop_token_ids": [3, 4, 5, 6, 7]}  # responses of different lengths


@pytest.mark.parametrize("token_filter", [{"name": "high_entropy", "top_fraction": 0.3},
                                          {"name": "kl_cov", "fraction": 0.05},
                                          {"name": "clip_cov", "fraction": 0.05, "cov_low": -10, "cov_high": 10}])
@pytest.mark.parametrize("trainer, algorithm", [
    ({"micro_batch_size": 2}, {}),  # micro-batches trimmed to their own longest response
    ({"micro_batch_size": 16}, {"mask_truncated": True}),  # truncated rows leave: a narrower batch
    ({"max_tokens_per_micro_batch": 64}, {"mask_truncated": True}),  # token budget
])
def test_filters_follow_the_micro_batch_cut_with_mixed_lengths(random_tiny_model, tmp_path, token_filter,
                                                                trainer, algorithm) -> None:
    """The selection is made over the whole mini-batch ([B, T]) and must be cut like every other
    per-token tensor of a micro-batch (its rows AND its trimmed width); the same selection, and so
    the same loss and gradient, as one micro-batch of every row (issue 19.1: a broadcast error)."""
    runs = []
    for layout in ({"micro_batch_size": 16}, trainer):
        recipe = small_run_recipe(random_tiny_model[0], tmp_path / f"run{len(runs)}", plugins=["reward_plugins"],
                                  reward=SHORT, rollout=MIXED,
                                  algorithm={"token_filter": token_filter, **algorithm},
                                  trainer={"total_steps": 1, **layout})
        runs.append(urlvr.train(recipe).metrics[0])
    assert 0 < runs[0]["response/truncation_rate"] < 1  # the lengths really differ
    for key in ("loss/policy", "actor/grad_norm", "actor/token_filter/selected_fraction"):
        assert runs[1][key] == pytest.approx(runs[0][key], rel=1e-5, abs=1e-9), key
