"""Sampler/trainer mismatch corrections (token TIS, sequence TIS, sequence MIS) against plain-Python
float64 loops, with padding and empty responses; the recipe section and the moved `tis_cap`."""

from __future__ import annotations

import math

import pytest
import torch

import urlvr
from conftest import small_run_recipe
from urlvr.algorithms.mismatch import MISMATCH_CORRECTIONS, SequenceMIS, SequenceTIS, TokenTIS
from urlvr.recipe import RecipeError, load_recipe

F64 = torch.float64


def batch(seed: int, rows: int = 6, length: int = 6, scale: float = 0.3) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    trainer = -torch.rand(rows, length, generator=gen, dtype=F64) * 3
    sampler = trainer + torch.randn(rows, length, generator=gen, dtype=F64) * scale
    lengths = torch.randint(1, length + 1, (rows,), generator=gen)
    lengths[seed % rows] = 0
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return trainer.masked_fill(mask == 0, float("nan")), sampler, mask


def reference_sequence_ratios(trainer, sampler, mask, form):
    """ρ_i = Π_t π_trainer/π_sampler, or its |y_i|-th root; 1 for an empty response."""
    out = []
    for i, row in enumerate(mask.tolist()):
        diffs = [float(trainer[i, t]) - float(sampler[i, t]) for t, m in enumerate(row) if m]
        total = sum(diffs)
        out.append(math.exp(total if form == "product" else (total / len(diffs) if diffs else 0.0)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_tis_matches_reference(seed: int) -> None:
    trainer, sampler, mask = batch(seed)
    out = TokenTIS(cap=1.2).weights(trainer, sampler, mask)
    ratios = [[math.exp(float(trainer[i, t]) - float(sampler[i, t])) if mask[i, t] else None for t in range(6)]
              for i in range(6)]
    want = [[min(r, 1.2) if r is not None else 1.0 for r in row] for row in ratios]
    torch.testing.assert_close(out.weights, torch.tensor(want, dtype=F64), rtol=1e-12, atol=0)
    real = [r for row in ratios for r in row if r is not None]
    assert out.token_means["rollout/tis_weight_mean"] == pytest.approx(sum(min(r, 1.2) for r in real) / len(real))
    assert out.token_means["rollout/tis_truncated_fraction"] == pytest.approx(sum(r > 1.2 for r in real) / len(real))
    assert not out.weights.requires_grad


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("form", ["product", "geometric_mean"])
def test_sequence_tis_matches_reference(seed: int, form: str) -> None:
    trainer, sampler, mask = batch(seed)
    cap = 1.5 if form == "product" else 1.05
    out = SequenceTIS(cap=cap, form=form).weights(trainer.clone().requires_grad_(False), sampler, mask)
    ratios = reference_sequence_ratios(trainer, sampler, mask, form)
    want = [[min(ratios[i], cap) if mask[i, t] else 1.0 for t in range(6)] for i in range(6)]
    torch.testing.assert_close(out.weights, torch.tensor(want, dtype=F64), rtol=1e-12, atol=0)
    present = [i for i in range(6) if mask[i].any()]
    assert out.sequence_means["rollout/seq_tis_weight_mean"] == pytest.approx(
        sum(min(ratios[i], cap) for i in present) / len(present))
    assert out.sequence_means["rollout/seq_tis_truncated_fraction"] == pytest.approx(
        sum(ratios[i] > cap for i in present) / len(present))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("form", "low", "high"), [("product", 0.5, 2.0), ("geometric_mean", 0.95, 1.05)])
def test_sequence_mis_matches_reference(seed: int, form: str, low: float, high: float) -> None:
    trainer, sampler, mask = batch(seed)
    out = SequenceMIS(low=low, high=high, form=form).weights(trainer, sampler, mask)
    ratios = reference_sequence_ratios(trainer, sampler, mask, form)
    kept = [low <= r <= high for r in ratios]
    want = [[(ratios[i] if kept[i] else 0.0) if mask[i, t] else 1.0 for t in range(6)] for i in range(6)]
    torch.testing.assert_close(out.weights, torch.tensor(want, dtype=F64), rtol=1e-12, atol=0)
    present = [i for i in range(6) if mask[i].any()]
    masked = sum(not kept[i] for i in present) / len(present)
    assert out.sequence_means["rollout/seq_mis_masked_fraction"] == pytest.approx(masked)
    assert 0.0 < masked < 1.0 or seed != 0 or form != "product"  # both outcomes on the first batch


def test_huge_product_is_capped_not_nan() -> None:
    trainer = torch.zeros(1, 800, dtype=F64)
    sampler = torch.full((1, 800), -1.0, dtype=F64)  # ρ = e^800: overflows float64
    mask = torch.ones(1, 800)
    assert SequenceTIS(cap=3.0).weights(trainer, sampler, mask).weights.unique().tolist() == [3.0]
    assert SequenceMIS().weights(trainer, sampler, mask).weights.unique().tolist() == [0.0]


def test_sections_and_the_moved_tis_cap() -> None:
    assert MISMATCH_CORRECTIONS.names() == ["none", "seq_mis", "seq_tis", "token_tis"]
    assert load_recipe({}).algorithm.mismatch.name == "none"
    r = load_recipe({"algorithm": {"mismatch": {"name": "token_tis", "cap": 3}}})
    assert r.algorithm.mismatch.cap == 3.0
    with pytest.raises(RecipeError, match=r"tis_cap moved to `mismatch: \{name: token_tis"):
        load_recipe({"algorithm": {"tis_cap": 2.0}})
    with pytest.raises(RecipeError, match="low .* must be below high"):
        load_recipe({"algorithm": {"mismatch": {"name": "seq_mis", "low": 1.0, "high": 1.0}}})


@pytest.mark.parametrize("mismatch", [{"name": "seq_mis", "low": 0.9, "high": 1.1}, {"name": "token_tis", "cap": 2}])
def test_corrections_log_in_a_step(random_tiny_model, tmp_path, mismatch) -> None:
    recipe = small_run_recipe(random_tiny_model[0], tmp_path / "run", plugins=["reward_plugins"],
                              reward={"terms": [{"name": "test_short_response"}], "oracle": "ground_truth"},
                              algorithm={"mismatch": mismatch}, trainer={"total_steps": 1})
    metrics = urlvr.train(recipe).metrics[0]
    if mismatch["name"] == "seq_mis":  # the transformers engine samples with the trainer's numerics
        assert metrics["rollout/seq_mis_masked_fraction"] == 0.0
    else:
        assert metrics["rollout/tis_truncated_fraction"] == 0.0
        assert metrics["rollout/tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
