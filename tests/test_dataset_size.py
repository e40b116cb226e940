"""The paper's dataset-size law (§5.1, Fig. 6) on the aligned tiny prior: majority-vote training on a
small prompt set holds its ground truth over a step budget in which a large set's falls.

Two quickstart-sized runs of `urlvr/tiny-aligned` (16 prompts x 8 samples, 80 tokens, lr 1e-4,
20 steps, seed 0), one on 16 problems (every step trains on the same 16: 20 epochs) and one on
256 (1.25 epochs): about 25 s each on one idle core. Measured (mean ground-truth reward of steps
1-5 -> steps 16-20), seeds 0 / 1 / 2, under the exponential-race sampler before commit 14abf5d
(not re-swept under the inverse-CDF sampler; seed 0, the test's run, passes both checks with it):

| problems | seed 0 | seed 1 | seed 2 |
|---|---|---|---|
| 16  | 0.43 -> 0.40 | 0.44 -> 0.45 | 0.44 -> 0.40 |
| 256 | 0.43 -> 0.15 | 0.40 -> 0.30 | 0.36 -> 0.20 |

The drop is 0.03 / 0.00 / 0.05 on the small set and 0.28 / 0.10 / 0.16 on the large one, and the
small set ends 0.25 / 0.15 / 0.20 above the large one. The margins below sit inside the worst
seed and above what a trainer that does not learn gives: with lr 1e-9 (run once) the large set
"drops" 0.05 (its last steps' prompts happen to be harder) and the small set ends 0.09 above it,
so both checks of the second test fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import urlvr

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
WINDOW = 5  # steps averaged at each end: one step is 16 prompts, +-0.05 of prompt-to-prompt noise


def ground_truth(tmp_path_factory, num_problems: int) -> list[float]:
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    recipe["output_dir"] = str(tmp_path_factory.mktemp(f"set{num_problems}") / "run")
    recipe["model"]["path"] = "urlvr/tiny-aligned"
    recipe["data"]["source"]["num_problems"] = num_problems
    recipe["trainer"].update(total_steps=STEPS, save_every=0, export_final_model=False)
    recipe["logging"] = {"console": False}
    result = urlvr.train(recipe)
    return [m["reward/ground_truth_mean"] for m in result.metrics]


@pytest.fixture(scope="module")
def small_and_large(tmp_path_factory) -> tuple[list[float], list[float]]:
    return ground_truth(tmp_path_factory, 16), ground_truth(tmp_path_factory, 256)


def drop(curve: list[float]) -> float:
    """Mean of the first WINDOW steps minus the mean of the last WINDOW."""
    return sum(curve[:WINDOW]) / WINDOW - sum(curve[-WINDOW:]) / WINDOW


def test_small_set_holds_its_ground_truth(small_and_large):
    small, _ = small_and_large
    assert len(small) == STEPS
    assert drop(small) < 0.10, small  # measured 0.05 at worst (seed 2)


def test_large_set_falls_where_the_small_one_holds(small_and_large):
    small, large = small_and_large
    assert drop(large) > 0.075, large  # measured 0.105 at worst (seed 1), seed 0 here 0.28; lr 1e-9: 0.05
    end_gap = (sum(small[-WINDOW:]) - sum(large[-WINDOW:])) / WINDOW
    assert end_gap > 0.12, (small, large)  # measured 0.15 at worst (seed 1), seed 0 here 0.25; lr 1e-9: 0.09
