"""End to end: a few CPU GRPO steps with each family of built-in rewards named in a recipe.

Uses the embedded tiny model when its assets are built (`urlvr/models/assets/tiny/`), otherwise
the random tiny Llama fixture. A random model rarely writes `\\boxed{}`, so the ensemble and
policy families extract answers with the `regex` extractor (the last digit), which gives groups
real, varied answers to vote on and verify.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import urlvr
from conftest import small_run_recipe
from urlvr.models.tiny import ASSET_DIR

pytestmark = pytest.mark.slow
LAST_DIGIT = {"pattern": r"(\d)[^\d]*$"}


@pytest.fixture(scope="module")
def model_path(random_tiny_model) -> Path:
    return Path("urlvr/tiny") if ASSET_DIR.is_dir() else random_tiny_model[0]


def train(model_path, tmp_path, reward, **sections):
    recipe = small_run_recipe(model_path, tmp_path / "run", reward=reward, **sections)
    result = urlvr.train(recipe)
    for metrics in result.metrics:
        assert all(math.isfinite(v) for v in metrics.values()), {k: v for k, v in metrics.items() if not math.isfinite(v)}
    return result.metrics


def test_certainty_family_trains(model_path, tmp_path):
    terms = [{"name": n, "weight": 0.2} for n in ("self_certainty", "token_entropy", "trajectory_entropy", "probability")]
    terms += [{"name": "probability_disparity", "kwargs": {"span": "response"}},
              {"name": "probability_disparity", "alias": "disparity_on_answer", "gate": "format"},
              {"name": "unified", "alias": "unified_traj", "kwargs": {"anchor": "onehot", "sign": -1}}]
    metrics = train(model_path, tmp_path, {"terms": terms, "certainty_logits": "raw"}, rollout={"temperature": 0.7})
    for key in ("self_certainty", "token_entropy", "trajectory_entropy", "probability", "probability_disparity",
                "disparity_on_answer", "unified_traj"):
        assert f"reward/{key}_mean" in metrics[0], key
    assert metrics[0]["reward/token_entropy_mean"] < 0 < metrics[0]["reward/self_certainty_mean"]
    assert metrics[0]["reward/unified_traj_mean"] == pytest.approx(metrics[0]["reward/trajectory_entropy_mean"])
    # the rewards give a gradient. Not `loss/policy != 0`: on-policy the loss value is
    # -sum_i A_i |o_i| / N, exactly 0 when a group's responses have equal lengths (its
    # normalised advantages sum to 0), as all 12-token responses here do since the sampler of
    # 14abf5d drew other tokens; its gradient sum_i A_i grad log pi(o_i) is not
    assert metrics[0]["actor/grad_norm"] > 0.0


def test_ensemble_family_trains_with_extra_voters(model_path, tmp_path):
    terms = [{"name": "majority_vote", "kwargs": {"ties": "first"}},
             {"name": "semantic_cluster", "kwargs": {"min_cluster_ratio": 0.25, "timeout_s": 60.0, "budget_s": 600.0}},
             {"name": "unified", "alias": "unified_mv", "kwargs": {"granularity": "answer", "transform": "exp", "tau": 0}}]
    reward = {"terms": terms, "extractor": "regex", "extractor_kwargs": LAST_DIGIT, "vote_group_size": 6}
    metrics = train(model_path, tmp_path, reward)
    assert metrics[0]["dynamics/answer_rate"] > 0
    assert 0 < metrics[0]["reward/majority_vote/majority_ratio_mean"] <= 1
    assert "reward/semantic_cluster/largest_cluster_ratio_mean" in metrics[0]
    assert metrics[0]["reward/semantic_cluster/cut_short_mean"] == 0.0  # single digits, generous limits: never out of time
    assert metrics[0]["reward/semantic_cluster_timeouts"] == 0.0  # counted every step, 0 included
    assert "reward/unified_mv_timeouts" not in metrics[0]  # exact equality cannot run out of time


def test_external_family_trains_on_countdown(model_path, tmp_path):
    terms = [{"name": "countdown", "kwargs": {"format_score": 0.1}}, {"name": "format", "weight": 0.5},
             {"name": "test_short_response", "weight": 0.1}]  # gives the random model a gradient
    reward = {"terms": terms, "oracle": "math_verify"}
    metrics = train(model_path, tmp_path, reward, plugins=["reward_plugins"],
                    data={"source": {"kind": "countdown", "num_problems": 16, "seed": 1}})
    assert "reward/countdown/correct_mean" in metrics[0] and "reward/countdown_mean" in metrics[0]
    assert "reward/oracle_timeouts" in metrics[0] and "reward/countdown_timeouts" not in metrics[0]


def test_policy_family_trains_with_self_verification_and_co_reward(model_path, tmp_path):
    terms = [{"name": "self_verification", "kwargs": {"prompt": "p1", "max_new_tokens": 6}, "on_error": "zero"},
             {"name": "co_reward", "kwargs": {"max_new_tokens": 6, "rephrased_samples": 3}},
             {"name": "test_short_response", "weight": 0.1}]
    reward = {"terms": terms, "extractor": "regex", "extractor_kwargs": LAST_DIGIT}
    metrics = train(model_path, tmp_path, reward, plugins=["reward_plugins"],
                    data={"source": {"kind": "countdown", "num_problems": 16, "seed": 1}})
    assert metrics[0]["reward/self_verification/error_rate"] == 0.0
    assert metrics[0]["dynamics/answer_rate"] > 0  # so verification prompts were generated...
    assert metrics[0]["reward/self_verification/unparsed_verdict_mean"] > 0  # ...and answered (not in \\boxed{})
    assert "reward/co_reward/rephrased_answer_rate_mean" in metrics[0]


@pytest.mark.parametrize("reward, message", [
    ({"terms": [{"name": "unified", "kwargs": {"anchor": "unifrom"}}]}, "anchor"),
    ({"terms": [{"name": "format", "gate": "formt"}]}, "did you mean 'format'"),
    ({"terms": [{"name": "format"}, {"name": "format"}]}, "appears twice; give one an `alias`"),
    ({"terms": [{"name": "format", "alias": "oracle"}]}, "share metrics with `reward.oracle`"),
    ({"terms": [{"name": "format"}], "vote_group_size": 2}, "vote_group_size"),
    ({"terms": [{"name": "format"}], "extractor": "regex"}, "needs a `pattern`"),
])
def test_reward_mistakes_fail_at_load_time(model_path, tmp_path, reward, message):
    with pytest.raises(Exception, match=message):
        urlvr.load_recipe(small_run_recipe(model_path, tmp_path / "run", reward=reward))
