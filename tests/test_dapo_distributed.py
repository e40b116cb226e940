"""Dynamic sampling on two CPU processes (gloo, ZeRO-2 under torchrun) trains like one process.

Why the runs are comparable: the selection of the step's groups reads only the gathered
per-group flags (first prompts_per_step informative groups in draw order), refill prompts carry
global indices (round r: r*P ..), and each rank trains its contiguous share of the selection,
receiving whole groups drawn by the other rank. So the trained groups, their order and the
gradient are one process's, and every metric matches (float noise aside).
"""

from __future__ import annotations

import pytest
import yaml

import urlvr
from test_dapo import tiny_majority_recipe
from test_distributed import assert_metrics_close, launch, max_weight_diff, read_metrics, read_weights, WEIGHT_ATOL

pytestmark = pytest.mark.slow
DYNAMIC = {"name": "zero_variance", "max_rounds": 4}


def recipe(out, zero_stage: int) -> dict:
    r = tiny_majority_recipe(out, DYNAMIC)
    r["trainer"]["export_final_model"] = True
    r["optim"] = {"lr": 1e-3, "deepspeed": {"zero_stage": zero_stage}}
    return r


def test_two_processes_sample_dynamically_like_one(tmp_path):
    single = urlvr.train(recipe(tmp_path / "single", zero_stage=0))
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path / "two", zero_stage=2)))
    launch("torchrun", ["train", str(path)], tmp_path, "two")
    one, two = read_metrics(single.run_dir), read_metrics(tmp_path / "two")
    assert any(m["dynamic_sampling/rounds"] > 1 for m in one), "the test needs refill rounds"
    assert_metrics_close(one, two, "dynamic sampling, 2 processes vs 1")
    diff = max_weight_diff(read_weights(single.run_dir), read_weights(tmp_path / "two"))
    assert diff <= WEIGHT_ATOL, f"final weights differ by {diff}"
