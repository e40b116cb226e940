"""Model Collapse Step, label-free detectors, the monitor, and `collapse.action` in a run."""

from __future__ import annotations

import json

import pytest

import urlvr
from conftest import small_run_recipe
from urlvr.metrics.collapse import COLLAPSE_DETECTORS, CollapseMonitor, Detector, model_collapse_step
from urlvr.recipe import RecipeError, load_recipe
from urlvr.trainer.checkpoint import complete_checkpoints


def test_model_collapse_step_raw_and_smoothed():
    steps = [1, 2, 3, 4, 5, 6]
    ra = [0.8, 0.5, 0.005, 0.3, 0.0, 0.0]
    assert model_collapse_step(steps, ra) == 3  # paper: first step below 1%
    assert model_collapse_step(steps, ra, window=2) == 6  # (0.3+0)/2, then (0+0)/2 < 0.01
    assert model_collapse_step(steps, ra, threshold=0.4) == 3
    assert model_collapse_step(steps, [0.9] * 6) is None


def test_model_collapse_step_skips_unmeasured_steps():
    # steps 2 and 3 had no labelled prompt: they are skipped, not read as 0
    assert model_collapse_step([1, 2, 3, 4], [0.5, None, None, 0.0], window=2) is None
    assert model_collapse_step([1, 2, 3, 4, 5], [0.5, None, None, 0.0, 0.0], window=2) == 5


def test_detectors_absolute_and_relative():
    saturation = COLLAPSE_DETECTORS.get("proxy_saturation")
    assert saturation.check([0.5, 0.97, 0.99], window=2) == pytest.approx((0.98, 0.95))
    assert saturation.check([0.97], window=2) is None  # not enough history
    assert saturation.check([0.9, 0.97], window=2) is None  # 0.935 <= 0.95
    length = COLLAPSE_DETECTORS.get("length_collapse")
    # baseline = mean of the first 2 = 100; last 2 average 45 < 0.5 * 100
    assert length.check([100, 100, 80, 50, 40], window=2) == pytest.approx((45.0, 50.0))
    assert length.check([100, 100, 60], window=2) is None  # relative ones need 2 x window values
    assert length.check([0, 0, 0, 0], window=2) is None  # nothing to collapse from
    assert length.check([100, 100, 30, 30], window=2, threshold=0.2) is None


def test_detector_registry_refuses_duplicates_and_typos():
    with pytest.raises(ValueError, match="already registered"):
        COLLAPSE_DETECTORS.register("kl_drift")(Detector("kl_drift", "x", "above", False, 1.0, ""))
    with pytest.raises(RecipeError, match="did you mean 'entropy_collapse'"):
        load_recipe({"collapse": {"detectors": [{"name": "entropy_colapse"}]}})


def _section(**kwargs):
    return load_recipe({"collapse": kwargs}).collapse


def test_monitor_fires_once_and_resumes_identically():
    section = _section(detectors=[{"name": "proxy_saturation", "window": 1}], smoothing_window=2)
    history = [{"reward/proxy_mean": 0.5, "dynamics/reward_accuracy": 0.5},
               {"reward/proxy_mean": 0.99, "dynamics/reward_accuracy": 0.03},
               {"reward/proxy_mean": 0.99, "dynamics/reward_accuracy": 0.0},
               {"reward/proxy_mean": 1.0, "dynamics/reward_accuracy": 0.0}]
    monitor = CollapseMonitor(section)
    fired = [[a.detector for a in monitor.observe(step, m)] for step, m in enumerate(history, 1)]
    assert fired == [[], ["proxy_saturation"], [], ["model_collapse"]]  # RA over 2 steps: .015 at step 3, 0 at 4
    assert monitor.collapse_step == 4
    # a monitor rebuilt from a checkpoint after step 2 reaches the same verdicts
    replay = CollapseMonitor(section)
    for step, m in enumerate(history[:2], 1):
        replay.observe(step, m)
    resumed = CollapseMonitor(section, json.loads(json.dumps(replay.state_dict())))
    assert [[a.detector for a in resumed.observe(s, m)] for s, m in ((3, history[2]), (4, history[3]))] == [[], ["model_collapse"]]
    assert resumed.summary()["model_collapse_step"] == 4


def test_best_checkpoint_by_metric_or_before_first_alarm():
    monitor = CollapseMonitor(_section(detectors=[{"name": "proxy_saturation", "window": 1}]))
    for step, proxy in ((1, 0.2), (2, 0.5), (3, 0.99)):
        monitor.observe(step, {"reward/proxy_mean": proxy})
        monitor.record_checkpoint(step)
    assert monitor.best_checkpoint_step() == 2  # the last one saved before the alarm at step 3
    by_eval = CollapseMonitor(_section(best_metric="eval/maj@4"))
    for step, score in ((1, 0.3), (2, 0.6), (3, 0.6), (4, 0.4)):
        by_eval.observe_eval({"eval/maj@4": score})
        by_eval.record_checkpoint(step)
    assert by_eval.best_checkpoint_step() == 2  # earliest of the tied best
    lowest = CollapseMonitor(_section(best_metric="eval/maj@4", best_mode="min"))
    lowest.checkpoints = dict(by_eval.checkpoints)
    assert lowest.best_checkpoint_step() == 1


# --------------------------------------------------------------------------- in a run
ALWAYS = [{"name": "proxy_saturation", "threshold": -1.0, "window": 3}]  # fires at step 3, whatever the model


def test_stop_keeps_the_best_checkpoint_and_writes_the_summary(random_tiny_model, tmp_path):
    recipe = small_run_recipe(random_tiny_model[0], tmp_path / "run",
                              trainer={"total_steps": 6, "save_every": 1, "keep_last": 1, "export_final_model": False},
                              collapse={"detectors": ALWAYS, "action": "stop"})
    result = urlvr.train(recipe)
    assert [m["step"] for m in result.metrics] == [1, 2, 3] and result.stopped_early
    # keep_last=1 would have pruned step 2; it is the best (last healthy) one, so it stays
    assert [c.name for c in complete_checkpoints(result.run_dir)] == ["step-000002", "step-000003"]
    assert (result.best_model_dir / "model.safetensors").is_file()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["stopped_early"] == {"step": 3, "detector": "proxy_saturation"}
    assert summary["best_checkpoint_step"] == 2 and summary["steps"] == 3
    assert [a["detector"] for a in summary["alarms"]] == ["proxy_saturation"]
    assert "model_collapse_step" in summary


def test_checkpoint_action_saves_at_the_alarm_and_goes_on(random_tiny_model, tmp_path):
    recipe = small_run_recipe(random_tiny_model[0], tmp_path / "run",
                              trainer={"total_steps": 4, "save_every": 0, "keep_last": 5, "export_final_model": False},
                              collapse={"detectors": ALWAYS, "action": "checkpoint"})
    result = urlvr.train(recipe)
    assert len(result.metrics) == 4 and not result.stopped_early
    assert [c.name for c in complete_checkpoints(result.run_dir)] == ["step-000003", "step-000004"]
