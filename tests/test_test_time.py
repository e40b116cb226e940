"""Test-time training (paper §5.2): `mode: test_time` trains on the evaluation prompts themselves."""

from __future__ import annotations

import json

import pytest

import urlvr
from conftest import small_run_recipe
from urlvr.recipe import RecipeError, load_recipe

EVAL_SET = {"kind": "arithmetic", "num_problems": 4, "seed": 42}
HELD_OUT = {"kind": "arithmetic", "num_problems": 2, "seed": 43}


def test_test_time_mode_trains_on_eval_prompts_and_evaluates_before_and_after(random_tiny_model, tmp_path):
    recipe = small_run_recipe(random_tiny_model[0], tmp_path / "run", mode="test_time",
                              trainer={"total_steps": 2, "save_every": 0, "export_final_model": False},
                              eval={"source": EVAL_SET, "held_out": {"other": HELD_OUT}, "samples_per_prompt": 2,
                                    "max_new_tokens": 6},
                              logging={"console": False, "completions_per_step": 100})
    del recipe["data"]  # the mode supplies the training prompts
    result = urlvr.train(recipe)
    assert [e["step"] for e in result.evaluations] == [0, 2]  # before step 1 and after the last
    assert all(e["eval/prompts"] == 4.0 and e["eval/other/prompts"] == 2.0 for e in result.evaluations)
    trained = {json.loads(line)["prompt_id"] for line in (result.run_dir / "completions.jsonl").read_text().splitlines()}
    assert trained == {f"arithmetic-s42-{i:06d}" for i in range(4)}  # the evaluation prompts, nothing else
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["mode"] == "test_time"
    evaluation = summary["evaluation"]
    assert evaluation["first"]["step"] == 0 and evaluation["last"]["step"] == 2
    assert set(evaluation["gain"]) == {f"eval/{name}{score}" for name in ("", "other/")
                                       for score in ("avg@2", "pass@2", "maj@2", "greedy_accuracy")}
    assert evaluation["gain"]["eval/avg@2"] == pytest.approx(evaluation["last"]["eval/avg@2"] - evaluation["first"]["eval/avg@2"])


@pytest.mark.parametrize("recipe, message", [
    ({"mode": "test_time"}, "mode test_time trains on eval.source: set it"),
    ({"mode": "test_time", "eval": {"source": EVAL_SET}, "data": {"source": HELD_OUT}}, "leave data.source unset"),
    ({"mode": "test_time", "eval": {"source": EVAL_SET, "at_end": False}}, "eval.at_end cannot be false"),
])
def test_test_time_recipe_errors(recipe, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)


def test_test_time_recipe_round_trips():
    recipe = load_recipe({"mode": "test_time", "eval": {"source": EVAL_SET}})
    assert recipe.data.source == recipe.eval.source and recipe.eval.at_start and recipe.eval.at_end
    assert load_recipe(recipe.model_dump(mode="json")) == recipe  # the run directory's recipe.yaml reloads
