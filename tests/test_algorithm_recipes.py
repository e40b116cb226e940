"""The algorithm recipes (recipes/algorithms/): each validates, states its source, carries its
paper's settings, and runs two CPU steps on the embedded tiny model."""

from __future__ import annotations


import pytest

import urlvr
from test_paper_recipes import REPO, cpu_overrides
from urlvr.recipe import load_recipe

ALGORITHMS = REPO / "recipes" / "algorithms"
OURS = ("gspo", "cispo", "dr-grpo", "rloo")  # the algorithm is their only change against the URLVR baseline


def recipe(name: str):
    return load_recipe(ALGORITHMS / f"{name}.yaml")


def test_headers_name_the_source_and_what_the_paper_does_not_state():
    for name in (*OURS, "dapo"):
        header = (ALGORITHMS / f"{name}.yaml").read_text().split("\nseed:")[0]
        assert header.startswith("# Source: ") and "arXiv:" in header.splitlines()[0] + header.splitlines()[1], name
        assert "# What each setting means:" in header and "# Not stated by the paper" in header, name
        assert "\n# Expect: " in header, name


def test_each_recipe_carries_its_papers_settings():
    gspo = recipe("gspo").algorithm
    assert (gspo.loss.name, gspo.loss.clip_eps_low, gspo.loss.clip_eps_high, gspo.loss_aggregation, gspo.advantage) == \
        ("gspo", 3e-4, 4e-4, "seq-mean-token-mean", "grpo")
    assert recipe("gspo").trainer.prompts_per_step // recipe("gspo").trainer.prompts_per_minibatch == 4
    cispo = recipe("cispo").algorithm
    assert (cispo.loss.name, cispo.loss.clip_eps_low, cispo.loss_aggregation) == ("cispo", None, "token-mean")
    dr = recipe("dr-grpo").algorithm
    assert (dr.advantage, dr.loss_aggregation, dr.loss.name, dr.kl_coef) == \
        ("dr_grpo", "seq-mean-token-sum-norm", "ppo_clip", 0.0)
    rloo = recipe("rloo").algorithm
    assert (rloo.advantage, rloo.loss.name) == ("rloo", "ppo_clip")
    baseline = load_recipe(REPO / "recipes" / "paper" / "rise-and-fall.yaml")
    for name in OURS:  # the algorithm (and mini-batches) is the only change against the URLVR baseline
        exclude = {"output_dir", "algorithm", "trainer"}
        assert recipe(name).model_dump(exclude=exclude) == baseline.model_dump(exclude=exclude), name


@pytest.mark.parametrize("name", OURS)
def test_algorithm_recipe_runs_two_cpu_steps(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    # four prompts in two mini-batches: the second update sees a ratio away from 1
    sets = cpu_overrides(name, tmp_path / "run", ALGORITHMS) + ["trainer.prompts_per_step=4"]
    result = urlvr.train(load_recipe(ALGORITHMS / f"{name}.yaml", sets))
    assert [m["step"] for m in result.metrics] == [1, 2]
    for m in result.metrics:
        assert m["actor/optimizer_steps_per_rollout"] == 2.0
        assert m["actor/ratio_mean"] == m["actor/ratio_mean"] and "reward/majority_vote_mean" in m
        if name.startswith("gspo"):
            assert "actor/token_clip_fraction" in m


def test_dapo_recipe_carries_the_papers_settings():
    r = recipe("dapo")
    assert (r.algorithm.loss.name, r.algorithm.loss.clip_eps_low, r.algorithm.loss.clip_eps_high) == ("ppo_clip", 0.2, 0.28)
    assert (r.algorithm.loss_aggregation, r.algorithm.kl_coef, r.algorithm.advantage) == ("token-mean", 0.0, "grpo")
    assert (r.rollout.dynamic_sampling.name, r.rollout.dynamic_sampling.max_rounds) == ("zero_variance", 3)
    overlong = {t.name: t for t in r.reward.terms}["overlong_penalty"]
    assert overlong.weight == 1.0 and overlong.kwargs["max_length"] == r.rollout.max_new_tokens
    baseline = load_recipe(REPO / "recipes" / "paper" / "rise-and-fall.yaml")
    exclude = {"output_dir", "algorithm", "trainer", "rollout", "reward"}
    assert r.model_dump(exclude=exclude) == baseline.model_dump(exclude=exclude)
    assert r.reward.terms[0] == baseline.reward.terms[0]  # the URLVR proxy replaces DAPO's accuracy reward


def test_dapo_recipe_runs_two_cpu_steps(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    sets = cpu_overrides("dapo", tmp_path / "run", ALGORITHMS) + ["trainer.prompts_per_step=4"]
    result = urlvr.train(load_recipe(ALGORITHMS / "dapo.yaml", sets))
    assert [m["step"] for m in result.metrics] == [1, 2]
    for m in result.metrics:
        assert m["actor/optimizer_steps_per_rollout"] == 2.0
        assert 1.0 <= m["dynamic_sampling/rounds"] <= 3.0 and "reward/overlong_penalty_mean" in m
    # the penalty acts: its ramp (tokens 5..8) lies within the 8-token budget (it scored 0 throughout before)
    assert any(m["reward/overlong_penalty_mean"] < 0 for m in result.metrics)
