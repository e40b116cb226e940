"""Typed reward knobs (issue 21): every reward's knobs are a pydantic section read from its
signature, so a recipe's `reward.terms[].kwargs` is validated like any other field (errors point
at the knob), and `urlvr schema` and the recipe reference list each reward's knobs."""

from __future__ import annotations

import inspect
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

import urlvr.builtins  # noqa: F401
from urlvr.errors import KnobError
from urlvr.recipe import Recipe, RecipeError, load_recipe
from urlvr.recipe.reference import render
from urlvr.rewards.base import REWARDS, RewardSpec, _check_reward_kwargs, reward
from urlvr.rewards.knobs import knob_text

CUMA = "recipes/zoo/cuma.yaml"


def _error(recipe: str, override: str) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, [override])
    assert "\n" not in str(err.value), err.value
    return str(err.value)


def test_every_reward_has_a_knob_section_that_is_its_signature():
    for name in REWARDS.names():
        spec = REWARDS.get(name)
        params = [p for p in list(inspect.signature(spec.fn).parameters.values())[2:]
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        fields = spec.knobs.model_fields
        assert list(fields) == [p.name for p in params], name
        for p in params:
            assert fields[p.name].is_required() == (p.default is p.empty), (name, p.name)
            if p.default is not p.empty:
                assert fields[p.name].default == p.default, (name, p.name)
        assert spec.knobs is spec.knobs  # derived once, kept on the registry's entry


def test_every_built_in_knob_is_documented_by_its_reward():
    # the recipe reference and the schema describe a knob with what the docstring says of it
    undocumented = [f"{name}.{knob}" for name in REWARDS.names() if REWARDS.get(name).fn.__module__.startswith("urlvr.")
                    for knob, field in REWARDS.get(name).knobs.model_fields.items() if not field.description]
    assert undocumented == []


def test_a_bad_knob_value_points_at_the_knob():
    # was `reward.terms.0: reward 'cuma': ...`: the field path stopped at the term
    assert _error(CUMA, "reward.terms.0.kwargs={majority_share: abc}").startswith(
        f"{CUMA}: reward.terms.0.kwargs.majority_share: reward 'cuma': argument 'majority_share'='abc' is invalid (")
    assert _error(CUMA, "reward.terms.0.kwargs={majority_share: '0.6'}").startswith(
        f"{CUMA}: reward.terms.0.kwargs.majority_share: reward 'cuma': argument 'majority_share'='0.6' is a str")


def test_the_rewards_own_checks_still_refuse_at_load():
    assert "majority_share must lie in" in _error(CUMA, "reward.terms.0.kwargs={majority_share: 0.3}")
    assert "does not divide rollout.group_size" in _error("recipes/zoo/scope.yaml", "reward.terms.0.kwargs={subgroup_size: 3}")
    assert "takes no argument 'majority_shar' (it takes: majority_share); did you mean 'majority_share'?" in \
        _error(CUMA, "reward.terms.0.kwargs={majority_shar: 0.6}")


def _plain(group, ctx, *, level: int, mode: Literal["a", "b"] = "a") -> list[float]:
    """A plugin reward.

    `level`: how loud. `mode` (which way)."""
    return [0.0] * group.size


def test_a_plugin_reward_gets_its_section_for_free_and_a_required_knob_is_refused_when_missing():
    spec = RewardSpec("plain", _plain, False, "A plugin reward.")
    assert spec.knobs.__name__ == "PlainKnobs"
    assert spec.knobs.model_fields["level"].description == "how loud"
    assert spec.knobs.model_fields["mode"].description == "which way"
    _check_reward_kwargs(spec, "plain", {"level": 3})
    with pytest.raises(KnobError, match="reward 'plain' needs the knob 'level'") as err:
        _check_reward_kwargs(spec, "plain", {"mode": "b"})
    assert err.value.knob == "level"
    with pytest.raises(KnobError, match="'mode'='c' is invalid"):
        _check_reward_kwargs(spec, "plain", {"level": 3, "mode": "c"})


class _LevelKnobs(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    level: int = Field(1, ge=1)
    """How loud, at least 1 (a bound the signature cannot say)."""


def test_a_declared_section_is_used_and_must_match_the_function():
    spec = RewardSpec("plain", _plain, False, "", declared_knobs=_LevelKnobs)
    assert spec.knobs is _LevelKnobs
    with pytest.raises(KnobError, match="greater than or equal to 1"):
        _check_reward_kwargs(spec, "plain", {"level": 0})

    class Other(BaseModel):
        loudness: int = 1

    with pytest.raises(TypeError, match="declares loudness, which the function does not take"):
        reward("_never_registered", knobs=Other)(_plain)
    assert "_never_registered" not in REWARDS


def test_the_schema_lists_each_rewards_knobs_under_its_name():
    term = Recipe.model_json_schema()["$defs"]["RewardTerm"]
    assert term["discriminator"] == {"propertyName": "name"}
    members = {m["properties"]["name"]["const"]: m for m in term["oneOf"]}
    assert sorted(members) == REWARDS.names()
    share = members["cuma"]["properties"]["kwargs"]["properties"]["majority_share"]
    assert share["type"] == "number" and share["default"] == 0.5 and "share of the voters" in share["description"]
    ties = members["majority_vote"]["properties"]["kwargs"]["properties"]["ties"]
    assert ties["enum"] == ["first", "all", "none"]
    assert members["format"]["properties"]["kwargs"]["properties"] == {}
    assert members["cuma"]["properties"]["weight"]["default"] == 1.0  # the term's own fields stay


def test_the_recipe_reference_lists_each_rewards_knobs():
    text = render()
    assert "## `reward.terms.kwargs` with `name: cuma` (CumaKnobs)" in text
    assert "| `majority_share` | float | `0.5` | the share of the voters the top answer must exceed" in text
    assert "| `ties` | Literal['first', 'all', 'none'] | `\"first\"` |" in text
    assert "`format`" in text.split("they take no knobs")[0].rsplit("\n", 1)[-1]


@pytest.mark.parametrize("doc, knob, text", [
    ("`majority_share`: the share, in [0.5, 1); 0.5 is ours.\nDiagnostics: `masked` (1 when masked).", "majority_share",
     "the share, in [0.5, 1); 0.5 is ours"),
    ("`timeout_s` per comparison; `budget_s` for all\ncomparisons; `workers` processes.", "budget_s", "for all comparisons"),
    ("Knobs: `top_k` (0: surprisal; 1, 2: top-k), `lam` (0.7, the code's).", "lam", "0.7, the code's"),
    ("Knobs: `top_k` (0: surprisal; 1, 2: top-k), `lam` (0.7, the code's).", "seed", ""),
])
def test_knob_text_reads_what_the_docstring_says_of_a_knob(doc, knob, text):
    assert knob_text(doc, knob) == text


class _LaxKnobs(BaseModel):  # pydantic's default: extra keys ignored
    level: int = 1


def test_a_knob_the_function_does_not_take_is_refused_even_by_a_lax_declared_section():
    spec = RewardSpec("plain", _plain, False, "", declared_knobs=_LaxKnobs)
    with pytest.raises(ValueError, match="reward 'plain' takes no argument 'loudness' \\(it takes: level\\)"):
        _check_reward_kwargs(spec, "plain", {"loudness": 2})


@pytest.mark.parametrize(("term", "knob"), [
    ({"name": "majority_vote", "kwargs": {"min_majority_ratio": 2.0}}, "min_majority_ratio"),
    ({"name": "majority_vote", "kwargs": {"min_majority_ratio": -1.0}}, "min_majority_ratio"),
    ({"name": "semantic_cluster", "kwargs": {"min_cluster_ratio": float("nan")}}, "min_cluster_ratio"),
    ({"name": "unified", "kwargs": {"granularity": "answer", "tau": float("nan")}}, "tau"),
    ({"name": "unified", "kwargs": {"granularity": "answer", "equivalence": "math_verify", "timeout_s": 0.0}}, "timeout_s"),
    ({"name": "co_reward", "kwargs": {"rephrased_samples": 0}}, "rephrased_samples"),
    ({"name": "co_reward", "kwargs": {"max_new_tokens": -5}}, "max_new_tokens"),
    ({"name": "self_verification", "kwargs": {"max_new_tokens": 0}}, "max_new_tokens"),
    ({"name": "self_verification", "kwargs": {"temperature": -1.0}}, "temperature"),
])
def test_a_knob_out_of_its_range_is_refused_at_load_naming_it(term, knob):
    # before: loaded, then failed at step 1 after the model load (min_majority_ratio 2.0), trained on
    # NaN rewards (tau nan) or silently meant another value (rephrased_samples 0 = the group size)
    with pytest.raises(RecipeError) as err:
        load_recipe({"reward": {"terms": [term]}})
    message = str(err.value)
    assert message.startswith(f"<dict>: reward.terms.0.kwargs.{knob}: reward '{term['name']}': argument '{knob}'=")
    assert "\n" not in message, message


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"pattern": "a(b)", "normalize": "false"}, "extractor 'regex': argument 'normalize'='false' is invalid (Input should be a valid boolean)"),
    ({"pattern": "a(b)", "group": True}, "extractor 'regex': argument 'group'=True is invalid (Input should be a valid integer)"),
    ({"pattern": 3}, "extractor 'regex': argument 'pattern'=3 is invalid (Input should be a valid string)"),
])
def test_extractor_knobs_are_typed_as_reward_knobs_are(kwargs, message):
    # before: `normalize: "false"` loaded and acted as true (a non-empty string), `group: true` as group 1
    with pytest.raises(RecipeError) as err:
        load_recipe({"reward": {"extractor": "regex", "extractor_kwargs": kwargs}})
    assert str(err.value) == f"<dict>: reward: {message}"
