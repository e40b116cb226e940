"""Breaker findings on the reward zoo (cuma, scope, evol_rl): every bad knob is a one-line
load-time RecipeError naming the reward and the knob -- never a TypeError traceback from the
reward's own check, never a ValueError at step 1 -- and a knob that would do nothing with the
recipe's group is refused."""

from __future__ import annotations

import pytest

import urlvr.builtins  # noqa: F401
from urlvr.recipe import load_recipe
from urlvr.recipe.load import RecipeError

ZOO = {"cuma": "recipes/zoo/cuma.yaml", "scope": "recipes/zoo/scope.yaml", "evol_rl": "recipes/zoo/evol-rl.yaml"}


def _refused(reward: str, overrides: list[str], *needles: str) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(ZOO[reward], overrides)
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("reward, knob, value", [
    ("cuma", "majority_share", "'0.6'"),  # a quoted number reached `0.5 <= share` as a str: TypeError
    ("scope", "lam", "'0.7'"),
    ("scope", "subgroup_size", "'2'"),
    ("scope", "votes_per_subgroup", "'2'"),
    ("evol_rl", "alpha", "'0.5'"),
])
def test_a_quoted_number_is_refused_naming_the_reward_and_the_knob(reward, knob, value):
    extra = ", embedding: tfidf" if reward == "evol_rl" else ""
    _refused(reward, [f"reward.terms.0.kwargs={{{knob}: {value}{extra}}}"], f"reward '{reward}'", repr(knob), "is a str")


@pytest.mark.parametrize("value", ["true", "1.0"])
def test_a_bool_or_float_for_an_int_literal_is_refused(value):
    # lax validation took true and 1.0 for the literal 1, and the reward received them as written
    _refused("scope", [f"reward.terms.0.kwargs={{top_k: {value}}}"], "reward 'scope'", "'top_k'")


def test_a_bool_for_a_float_is_refused():
    _refused("cuma", ["reward.terms.0.kwargs={majority_share: true}"], "reward 'cuma'", "'majority_share'", "is a bool")


def test_an_int_for_a_float_is_still_accepted():
    assert load_recipe(ZOO["evol_rl"], ["reward.terms.0.kwargs={embedding: tfidf, alpha: 1}"]).reward.terms[0].kwargs["alpha"] == 1


def test_evol_rl_unknown_embedder_is_one_line_with_a_suggestion():
    # was an UnknownNameError (a KeyError) escaping the pydantic validator as a traceback
    _refused("evol_rl", ["reward.terms.0.kwargs={embedding: tfdif}"], "evol_rl", "embedding", "did you mean 'tfidf'")


@pytest.mark.parametrize("kwargs, needle", [
    ("{subgroup_size: 3}", "does not divide rollout.group_size (4)"),  # was a ValueError at step 1
    ("{subgroup_size: 8}", "does not divide rollout.group_size (4)"),
    ("{votes_per_subgroup: 5}", "exceeds rollout.group_size (4)"),
])
def test_scope_knobs_that_do_not_fit_the_group_are_refused_at_load(kwargs, needle):
    _refused("scope", [f"reward.terms.0.kwargs={kwargs}"], "scope", needle)


def test_scope_with_extra_voters_is_refused_at_load_not_at_step_1():
    _refused("scope", ["reward.vote_group_size=8"], "scope", "vote_group_size")


def test_scope_lam_without_a_search_is_refused():
    _refused("scope", ["reward.terms.0.kwargs={subgroup_size: 2, lam: 0.3}"], "scope", "lam", "subgroup_size=2")
    assert load_recipe(ZOO["scope"], ["reward.terms.0.kwargs={subgroup_size: 2}"])


def test_scope_confidence_knobs_with_one_vote_per_label_are_refused():
    # one voter per subgroup: the confidence weights (top_k, step_delimiter) cannot change a label
    _refused("scope", ["reward.terms.0.kwargs={votes_per_subgroup: 1, top_k: 1}"], "scope", "top_k", "votes_per_subgroup")
    _refused("scope", ["rollout.group_size=2"], "scope", "top_k", "half of 2 = 1")
    assert load_recipe(ZOO["scope"], ["reward.terms.0.kwargs={votes_per_subgroup: 1}"])


def test_evol_rl_novelty_knobs_with_two_samples_are_refused():
    _refused("evol_rl", ["rollout.group_size=2", "trainer.micro_batch_size=2"], "evol_rl", "embedding and alpha", "group_size 2")
    assert load_recipe(ZOO["evol_rl"], ["rollout.group_size=3", "trainer.micro_batch_size=3"])


def test_probe_takes_a_zoo_recipe_whose_update_knobs_need_a_ratio():
    """`urlvr probe --recipe recipes/zoo/evol-rl.yaml --reward evol_rl` was refused: the probe forces
    one mini-batch per step (nothing is trained), and the recipe's clip_eps_high then 'needs a
    ratio'. The probe keeps the advantage estimator it measures and drops the update's knobs."""
    import yaml

    from urlvr.commands.probe import probe_recipe

    base = yaml.safe_load(open(ZOO["evol_rl"]).read())
    recipe = load_recipe(probe_recipe(base, "urlvr/tiny", ["evol_rl"], group_size=None))
    assert recipe.reward.terms[0].kwargs == {"embedding": "tfidf", "alpha": 0.5}
    base["algorithm"].update(advantage="rloo")
    assert load_recipe(probe_recipe(base, "urlvr/tiny", ["evol_rl"], group_size=None)).algorithm.advantage == "rloo"


def test_a_yaml_flow_mapping_without_a_space_says_why_the_knob_is_unknown():
    # `--set reward.terms.0.kwargs={votes_per_subgroup:3}` is the key 'votes_per_subgroup:3' in YAML
    _refused("scope", ["reward.terms.0.kwargs={votes_per_subgroup:3}"], "'votes_per_subgroup:3'", "write `{a: 1}`")


@pytest.mark.parametrize("bad", [dict(window="5"), dict(window=2.5), dict(window=True), dict(tau_fr="0.3"), dict(frs="no")])
def test_ttrl_guard_settings_of_the_wrong_type_are_refused_up_front(bad):
    # were a TypeError traceback ('5' < 1) or accepted and failing mid-step (ratios[-2.5:])
    from urlvr.algorithms.ttrl_guard import GuardSettings

    with pytest.raises(ValueError, match=f"TTRL-Guard: {next(iter(bad))} must be a"):
        GuardSettings(**bad)
    assert GuardSettings(tau_fr=0, window=3).tau_fr == 0  # an int for a float is fine


def test_scope_step_delimiter_split_across_tokens_still_ends_a_step():
    # urlvr/tiny's tokenizer is character-level: "\n\n" is two tokens, and a step used to end only
    # at a token whose own text held the whole delimiter, so no response ever had two steps and
    # step_delimiter did nothing there
    from urlvr.rewards.scope import step_spans

    assert step_spans(["a", "\n", "\n", "b"], "\n\n") == [(0, 3), (3, 4)]
    assert step_spans(["a", ".\n", "\nb", "c", "\n\n"], "\n\n") == [(0, 3), (3, 5)]
    assert step_spans(["\n", "x", "\n"], "\n\n") == [(0, 3)]  # not adjacent: no step ends
    assert step_spans(["\n", "\n", "\n"], "\n\n") == [(0, 2), (2, 3)]  # a delimiter's characters are used once
    assert step_spans(["a", "STEP", "b"], "STEP") == [(0, 2), (2, 3)]  # whole-token delimiters as before
    assert step_spans(["ST", "E", "P", "b"], "STEP") == [(0, 3), (3, 4)]


def test_an_exponent_without_a_dot_says_yaml_read_it_as_text():
    # PyYAML reads 5e-1 as the string '5e-1': "write it unquoted" would be wrong advice there
    _refused("cuma", ["reward.terms.0.kwargs={majority_share: 5e-1}"], "'majority_share'", "write 1.0e-3")
    assert load_recipe(ZOO["cuma"], ["reward.terms.0.kwargs={majority_share: 5.0e-1}"]).reward.terms[0].kwargs["majority_share"] == 0.5
