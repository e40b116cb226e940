"""The step core's extension points: a plugin loss with its own section trains, token statistics
are computed only when some part of the run declares them, and unknown names fail at load time."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import urlvr
from conftest import small_run_recipe
from urlvr.algorithms.token_stats import TOKEN_STATS
from urlvr.recipe import RecipeError, load_recipe

SHORT = {"terms": [{"name": "test_short_response"}], "oracle": "ground_truth"}


def recipe_for(random_tiny_model, out, **sections) -> dict:
    sections = {"plugins": ["reward_plugins", "step_plugins"], "reward": SHORT, **sections}
    return small_run_recipe(random_tiny_model[0], out, **sections)


@pytest.fixture
def computed_stats(monkeypatch) -> set[str]:
    """Names of the token statistics computed during the test (each registry entry wrapped)."""
    seen: set[str] = set()
    for name in TOKEN_STATS.names():
        fn = TOKEN_STATS.get(name)

        def counting(logits, lse, targets, _fn=fn, _name=name):
            seen.add(_name)
            return _fn(logits, lse, targets)

        monkeypatch.setitem(TOKEN_STATS._entries, name, counting)
    return seen


def test_plugin_loss_with_its_own_section_trains(random_tiny_model, tmp_path):
    loss = {"name": "test_truncated_pg", "max_ratio": 1.5}
    result = urlvr.train(recipe_for(random_tiny_model, tmp_path / "run", algorithm={"loss": loss},
                                    trainer={"total_steps": 1}))
    metrics = result.metrics[0]
    assert metrics["actor/max_ratio_knob"] == 1.5  # the section's own knob reached the loss
    assert metrics["actor/truncated_fraction"] == 0.0  # on-policy: ratio 1 < 1.5
    assert metrics["loss/policy"] != 0.0 and "actor/clip_fraction" not in metrics
    saved = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "test_truncated_pg" in saved and "max_ratio: 1.5" in saved  # the variant round-trips


def test_plugin_loss_knobs_are_validated(tmp_path):
    base = {"plugins": ["step_plugins"]}
    with pytest.raises(RecipeError, match=r"algorithm\.loss\.max_ratio: Input should be greater than 1"):
        load_recipe({**base, "algorithm": {"loss": {"name": "test_truncated_pg", "max_ratio": 0.5}}})
    with pytest.raises(RecipeError, match=r"unknown field 'max_ratoi'; did you mean 'max_ratio'\?"):
        load_recipe({**base, "algorithm": {"loss": {"name": "test_truncated_pg", "max_ratoi": 3}}})


def test_plugin_statistic_is_computed_only_when_declared(random_tiny_model, tmp_path):
    import step_plugins

    step_plugins.STAT_CALLS.clear()
    urlvr.train(recipe_for(random_tiny_model, tmp_path / "off", trainer={"total_steps": 1}))
    assert step_plugins.STAT_CALLS == []  # registered, but nothing declared it
    reward = {"terms": [{"name": "test_short_response"}, {"name": "test_reads_max_logit", "weight": 0.1}],
              "oracle": "ground_truth"}
    result = urlvr.train(recipe_for(random_tiny_model, tmp_path / "on", reward=reward, trainer={"total_steps": 1}))
    # one call per micro-batch of the one scoring pass (4 prompts x 4 samples in 2 micro-batches of 8),
    # over the response tokens that exist: padding never reaches the LM head
    assert len(step_plugins.STAT_CALLS) == 2 and all(len(shape) == 1 for shape in step_plugins.STAT_CALLS)
    assert sum(n for (n,) in step_plugins.STAT_CALLS) == result.metrics[0]["perf/response_tokens"]
    assert result.metrics[0]["reward/test_reads_max_logit_mean"] != 0.0


def test_majority_vote_computes_only_what_it_needs(random_tiny_model, tmp_path, computed_stats):
    vote = {"terms": [{"name": "majority_vote"}], "oracle": "ground_truth"}
    urlvr.train(recipe_for(random_tiny_model, tmp_path / "bare", reward=vote, dynamics={"token_metrics": []},
                           collapse={"detectors": [{"name": "proxy_saturation"}]}, trainer={"total_steps": 1}))
    assert computed_stats == {"logprob"}  # old log-probs only: no entropy, no top-2 search
    computed_stats.clear()
    result = urlvr.train(recipe_for(random_tiny_model, tmp_path / "default", reward=vote, trainer={"total_steps": 1}))
    # dynamics.token_metrics' default (entropy is also watched by the default entropy_collapse detector)
    assert computed_stats == {"logprob", "entropy", "self_certainty"}
    assert {"actor/entropy_mean", "actor/self_certainty_mean"} <= set(result.metrics[0])


def test_certainty_reward_and_detector_declare_their_statistics(random_tiny_model, tmp_path, computed_stats):
    reward = {"terms": [{"name": "probability_disparity", "kwargs": {"span": "response"}}], "oracle": "ground_truth"}
    urlvr.train(recipe_for(random_tiny_model, tmp_path / "run", reward=reward, trainer={"total_steps": 1},
                           dynamics={"token_metrics": []}, collapse={"detectors": [{"name": "entropy_collapse"}]}))
    assert computed_stats == {"logprob", "top1_prob", "top2_prob", "entropy"}


def test_settings_skip_the_scoring_pass_only_when_nothing_needs_it():
    from urlvr.dist import DistInfo
    from urlvr.trainer.settings import RunSettings

    def scoring_pass(**sections) -> bool:
        recipe = load_recipe({"plugins": ["reward_plugins"], "reward": SHORT,
                              "trainer": {"prompts_per_step": 4, "prompts_per_minibatch": 4}, **sections})
        return RunSettings.derive(recipe, DistInfo(0, 1, 0, torch.device("cpu"))).scoring_pass

    assert not scoring_pass()  # on-policy; metrics and detectors read statistics after the update
    assert not scoring_pass(algorithm={"mismatch": {"name": "token_tis", "cap": 2.0}, "entropy_coef": 0.01})
    assert scoring_pass(reward={"terms": [{"name": "self_certainty"}]})  # a reward reads them before the update
    assert scoring_pass(trainer={"prompts_per_step": 4, "prompts_per_minibatch": 2})  # 2 optimizer steps
    assert scoring_pass(trainer={"prompts_per_step": 4, "prompts_per_minibatch": 4, "ppo_epochs": 2})


def test_skipped_scoring_pass_gives_the_update_of_the_scoring_pass(random_tiny_model, tmp_path, monkeypatch):
    """On-policy with no reward reading statistics: no scoring forward; the training forward's
    detached log-probs are the old ones (ratio exactly 1) and its statistics feed the metrics,
    truncated IS and the KL to pi_0 -- the same weights and metrics as the run forced through it."""
    from urlvr.trainer.actor import Actor
    from urlvr.trainer.settings import RunSettings

    calls = []
    real_score = Actor.score
    monkeypatch.setattr(Actor, "score", lambda self, *args, **kw: calls.append(1) or real_score(self, *args, **kw))
    sections = dict(algorithm={"mismatch": {"name": "token_tis", "cap": 1.5}, "entropy_coef": 0.01}, dynamics={"kl_to_initial_every": 1},
                    trainer={"total_steps": 2}, rollout={"group_size": 4, "max_new_tokens": 12,
                                                         "stop_token_ids": [3, 4, 5, 6, 7]})
    skipped = urlvr.train(recipe_for(random_tiny_model, tmp_path / "skipped", **sections))
    assert calls == []
    monkeypatch.setattr(RunSettings, "scoring_pass", property(lambda self: True))
    scored = urlvr.train(recipe_for(random_tiny_model, tmp_path / "scored", **sections))
    assert len(calls) == 2 * 2  # the control ran it: 2 steps x 2 micro-batches

    for a, b in zip(scored.metrics, skipped.metrics, strict=True):
        assert b["actor/ratio_min"] == b["actor/ratio_max"] == 1.0
        assert a.keys() == b.keys() and {"actor/entropy_mean", "rollout/tis_weight_mean", "actor/kl_to_initial"} <= set(b)
        for key in a:
            if not key.startswith(("time/", "perf/tokens_per_second")):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    want = load_file(scored.final_model_dir / "model.safetensors")
    got = load_file(skipped.final_model_dir / "model.safetensors")
    assert max(float((want[k] - got[k]).abs().max()) for k in want) < 1e-6


@pytest.mark.parametrize(("recipe", "message"), [
    ({"algorithm": {"loss": "ppo_clp"}}, "algorithm.loss: unknown policy loss 'ppo_clp'; did you mean 'ppo_clip'?"),
    ({"dynamics": {"token_metrics": ["entropyy"]}},
     "dynamics.token_metrics.0: unknown token statistic 'entropyy'; did you mean 'entropy'?"),
    ({"plugins": ["step_plugins"], "reward": {"terms": [{"name": "test_declares_unknown_stat"}]}},
     "reward 'test_declares_unknown_stat' declares stats=('test_no_such_stat',): unknown token statistic 'test_no_such_stat'"),
    ({"algorithm": {"clip_eps_high": 0.28}}, "clip_eps_high moved into the loss's own section"),
    ({"algorithm": {"kl_coef": 0.1, "kl_estimator": "k1"}}, "kl_estimator 'k1' cannot be a loss term"),
])
def test_unknown_names_fail_at_load_time(recipe, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    assert message in str(err.value)
