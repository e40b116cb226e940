"""RESTRAIN (`algorithm.advantage_shaping: restrain`, arXiv 2510.02172 §3) wired into the step: the
step's advantages are RESTRAIN's from each group's answers with the recipe's estimator, the prompt
weights come from the starting model once (drawn before step 1, restored on resume, never drawn
again from a trained model), the zoo recipe runs, and the combinations that would silently do
nothing are refused. The formulas against a float64 reference: tests/test_restrain_reference.py."""

from __future__ import annotations

import json

import pytest
import torch

from urlvr.algorithms.restrain import RestrainSettings, restrain_group

ZOO = "recipes/zoo/restrain.yaml"
VOLATILE = ("time/", "perf/tokens_per_second")


def _clean(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def _zoo(out, *overrides):
    from urlvr.recipe import load_recipe

    return load_recipe(ZOO, [f"output_dir={out}", *overrides])


def test_the_step_gives_restrains_advantages_from_the_answers_with_the_recipes_estimator():
    """`with_advantages` replaces the estimator's advantages of the reward by RESTRAIN's, made with
    the recipe's estimator (rloo here, not GRPO) from each group's voters and trained answers, and
    scaled by each prompt's stored reference share."""
    from types import SimpleNamespace

    from urlvr.algorithms.advantages import ADVANTAGE_ESTIMATORS
    from urlvr.dist import DistInfo
    from urlvr.recipe import load_recipe
    from urlvr.trainer.loop import with_advantages
    from urlvr.trainer.settings import RunSettings
    from urlvr.trainer.stages import Scored

    recipe = load_recipe({"model": {"path": "urlvr/tiny"}, "rollout": {"group_size": 4},
                          "reward": {"vote_group_size": 6},
                          "algorithm": {"advantage": "rloo", "advantage_shaping": {"name": "restrain", "kappa": 0.5}}})
    settings = RunSettings.derive(recipe, DistInfo(0, 1, 0, torch.device("cpu")))
    state = {"x": {"reference_share": 0.5}, "y": {"reference_share": 1.0}}
    parts = SimpleNamespace(settings=settings, advantage_state=state)
    x_voters, y_voters = ("1", "1", "2", None, "1", "2"), ("3", "4", "5", None, "3", "6")
    contexts = [SimpleNamespace(voters=x_voters, answers=x_voters[:4]), SimpleNamespace(voters=y_voters, answers=y_voters[:4])]
    total = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # the vote's rewards: replaced
    scored = Scored(stats={}, contexts=contexts, rewards=SimpleNamespace(total=total))
    rollout = SimpleNamespace(records=[SimpleNamespace(prompt_id="x"), SimpleNamespace(prompt_id="y")])
    out = with_advantages(parts, scored, torch.device("cpu"), rollout, 1)

    rloo = ADVANTAGE_ESTIMATORS.get("rloo")
    knobs = RestrainSettings(sigma=0.3, center=1.0, kappa=0.5, delta=0.5)
    x = restrain_group(x_voters, x_voters[:4], lambda r: rloo(r), knobs, 0.5)
    y = restrain_group(y_voters, y_voters[:4], lambda r: rloo(r), knobs, 1.0)
    assert not x.penalized and y.penalized  # y's majority, 2 of 6 votes, is under kappa 0.5
    assert torch.equal(out.advantages, torch.tensor([*x.advantages, *y.advantages]).float())
    assert out.advantages[4:].tolist() == [-0.5] * 4  # -delta · g(1.0) = -0.5 · 1
    grpo = restrain_group(x_voters, x_voters[:4], lambda r: ADVANTAGE_ESTIMATORS.get("grpo")(r), knobs, 0.5)
    assert not torch.allclose(out.advantages[:4], torch.tensor(grpo.advantages).float())  # the estimator counts
    assert out.advantage_metrics == {"restrain/penalized_fraction": 0.5, "restrain/prompt_weight_mean": pytest.approx(
        (x.prompt_weight + 1.0) / 2), "restrain/candidates_mean": 3.0}  # {1, 2} and {3, 4, 5, 6}
    assert parts.advantage_state is state  # nothing per step to keep


def test_the_zoo_recipe_draws_the_prompt_weights_first_then_trains_two_steps(tmp_path, capfd):
    import urlvr

    recipe = _zoo(tmp_path / "run")
    assert recipe.model.path == "urlvr/tiny" and recipe.algorithm.advantage_shaping.name == "restrain"
    result = urlvr.train(recipe)
    err = capfd.readouterr().err
    assert "drawing the starting model's answers for the prompt weights: 8 prompts x 4 samples" in err
    assert "prompt weights: 8/8 prompts drawn" in err
    assert [m["step"] for m in result.metrics] == [1, 2]
    assert any(m["restrain/penalized_fraction"] > 0 for m in result.metrics)  # tiny's answers scatter
    assert all(0 < m["restrain/prompt_weight_mean"] < 1 for m in result.metrics)
    assert all(m["restrain/candidates_mean"] > 1 for m in result.metrics)
    assert all(m["actor/grad_norm"] > 0 for m in result.metrics)


def test_restrain_resumes_exactly_with_the_starting_models_prompt_weights(tmp_path, capfd):
    """4 steps = 2 + resume 2, bit for bit: the checkpoint holds every prompt's reference share and the
    resume never draws them again (drawn from the trained model they would differ)."""
    from urlvr.trainer.run import train

    whole = train(_zoo(tmp_path / "whole", "trainer.total_steps=4"))
    train(_zoo(tmp_path / "split", "trainer.total_steps=2", "trainer.save_every=2"))
    state = json.loads((tmp_path / "split" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    shares = state["advantage_shaping"]
    assert len(shares) == 8 and all(s["reference_share"] in (0.0, 0.25, 0.5, 0.75, 1.0) for s in shares.values())
    capfd.readouterr()
    resumed = train(_zoo(tmp_path / "split", "trainer.total_steps=4"), resume=tmp_path / "split")
    assert "drawing the starting model's answers" not in capfd.readouterr().err
    assert _clean(resumed.metrics) == _clean(whole.metrics[2:])


def test_a_checkpoint_without_prompt_weights_is_refused_on_resume(tmp_path):
    from urlvr.errors import RecipeError
    from urlvr.trainer.run import train

    train(_zoo(tmp_path / "run", "algorithm.advantage_shaping.prompt_weighting=false", "trainer.save_every=2"))
    files = lambda: {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.name != ".urlvr.lock"}  # noqa: E731
    before = files()
    with pytest.raises(RecipeError, match="no starting-model answers for 8 prompts"):
        train(_zoo(tmp_path / "run", "trainer.total_steps=4"), resume=tmp_path / "run")
    # refused before the resume is recorded: a retry compares against the recipe that trained, not the refused one
    assert files() == before and not list((tmp_path / "run").glob("recipe.resume-*.yaml"))


def test_without_prompt_weighting_nothing_is_drawn_before_step_1(tmp_path, capfd):
    from urlvr.trainer.run import train

    result = train(_zoo(tmp_path / "run", "algorithm.advantage_shaping.prompt_weighting=false"))
    assert "prompt weights" not in capfd.readouterr().err
    assert all(m["restrain/prompt_weight_mean"] == 1.0 for m in result.metrics)


@pytest.mark.parametrize("override, message", [
    ("reward.terms=[{name: self_certainty}]", r"reward.terms \['self_certainty'\] would only be logged"),
    ("reward.terms=[{name: majority_vote}, {name: format, weight: 0.1}]", "would only be logged"),
    ("rollout.dynamic_sampling=zero_variance", "rollout.dynamic_sampling drops such groups"),
    ("algorithm.advantage_shaping.sigma=0", "greater than 0"),
    ("algorithm.advantage_shaping.kappa=1.5", "less than or equal to 1"),
    ("algorithm.advantage_shaping.delta=.inf", "algorithm.advantage_shaping.delta: Input should be a finite number"),
    # the vote's own knobs shape only its reward, which RESTRAIN replaces: they were accepted and did nothing
    ("reward.terms=[{name: majority_vote, kwargs: {min_majority_ratio: 0.5}}]", r"reward.terms.0.kwargs would shape"),
    ("reward.terms=[{name: majority_vote, kwargs: {no_answer: vote, ties: all}}]", r"reward.terms.0.kwargs would shape"),
    ("reward.terms.0.weight=2", r"reward.terms.0.weight would shape only the logged reward"),
    ("reward.terms=[{name: majority_vote, weight: 0, gate: format}]", r"reward.terms.0.weight and reward.terms.0.gate"),
])
def test_combinations_that_would_do_nothing_are_refused(tmp_path, override, message):
    from urlvr.errors import RecipeError

    with pytest.raises((RecipeError, ValueError), match=message):
        _zoo(tmp_path / "run", override)


def test_a_prompt_without_a_drawn_reference_share_is_named():
    import random

    from urlvr.algorithms.advantage_shaping import RestrainShaping
    from urlvr.algorithms.advantages import grpo_advantages

    with pytest.raises(RuntimeError, match="no starting-model answers were drawn for prompt 'q7'"):
        RestrainShaping().shape({}, ["q7"], [["1", "1"]], [["1", "1"]], torch.zeros(1, 2, dtype=torch.float64),
                                random.Random(0), estimate=grpo_advantages)


@pytest.mark.parametrize("sigma", [1e-170, 1e-300])
def test_a_sigma_whose_square_underflows_gives_the_small_sigma_limit(sigma):
    """sigma² underflows to 0 below ~1e-162: g and the label weights must take their limit (the
    shares nearest the centre share the weight, g = 0 elsewhere), as sigma 1e-3 does, not divide by 0."""
    from urlvr.algorithms.advantages import grpo_advantages
    from urlvr.algorithms.restrain import label_weights, shaping

    tiny, small = (RestrainSettings(sigma=s, center=1.0, kappa=0.3, delta=0.5) for s in (sigma, 1e-3))
    voters = ["1", "1", "2", "3", None]  # f = 2/5, 1/5, 1/5: "1" nearest the centre 1
    for share in (None, 0.5, 1.0):
        got = restrain_group(voters, voters[:4], grpo_advantages, tiny, share)
        assert got == restrain_group(voters, voters[:4], grpo_advantages, small, share)
    assert shaping(1.0, tiny) == 1.0 and shaping(0.5, tiny) == 0.0
    assert label_weights([0.4, 0.2, 0.2], tiny) == [1.0, 0.0, 0.0]
    assert label_weights([0.4, 0.2, 0.4], tiny) == [0.5, 0.0, 0.5]  # a tie at the nearest share splits it
    assert label_weights([0.4, 0.2], RestrainSettings(sigma=sigma, center=0.0, kappa=0.3, delta=0.5)) == [0.0, 1.0]


@pytest.mark.parametrize("old, new, refused", [
    ("restrain", "ttrl_guard", True),  # ttrl_guard read {"reference_share": ...} as a history: TypeError at step 3
    ("ttrl_guard", "restrain", True),
    ("none", "restrain", False),  # nothing to misread (restrain's own check names the missing shares)
    ("restrain", "none", False),
    ("none", "ttrl_guard", False),
])
def test_a_resume_never_hands_one_shapings_state_to_another(tmp_path, old, new, refused):
    """trainer_state.json's `advantage_shaping` holds the old shaping's per-prompt state: a resume
    that switches to another shaping (not `none`) is refused before anything loads, naming the field."""
    import yaml

    from urlvr.errors import RecipeError
    from urlvr.recipe import load_recipe
    from urlvr.trainer.resume import resume_changes

    def recipe(name):
        return load_recipe({"model": {"path": "urlvr/tiny"}, "mode": "test_time",
                            "eval": {"source": {"kind": "arithmetic", "num_problems": 4}},
                            "trainer": {"total_steps": 4, "prompts_per_step": 4, "prompts_per_minibatch": 4},
                            "algorithm": {"advantage_shaping": name}})

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe(old).model_dump(mode="json")))
    if refused:
        with pytest.raises(RecipeError, match=f'algorithm.advantage_shaping.name: "{old}" -> "{new}" .*per-prompt state'):
            resume_changes(tmp_path, recipe(new), 2)
    else:
        assert [str(c) for c in resume_changes(tmp_path, recipe(new), 2)][0].startswith("algorithm.advantage_shaping.name")


@pytest.mark.parametrize("rank, prompts", [(0, 5), (1, 4)])
def test_the_prompt_weight_pass_holds_one_generation_context_in_a_steps_batches(monkeypatch, rank, prompts):
    """9 prompts over 2 ranks: 5 and 4 each. Under ZeRO-3 a generation context is a collective (the
    parameters are gathered), so a context per batch made 2 on one rank and 1 on the other: gloo's
    collective mismatch (SIGABRT) before step 1. One context holds the whole pass, and its batches
    are a step's prompts on one rank (prompts_per_step 4 / 2 ranks), not a whole step's on each."""
    import contextlib
    from types import SimpleNamespace

    import urlvr.trainer.reference_answers as reference_answers
    from urlvr.dist import DistInfo
    from urlvr.recipe import load_recipe
    from urlvr.rollout.base import Sample
    from urlvr.trainer.settings import RunSettings

    recipe = load_recipe(ZOO, ["data.source.num_problems=9"])
    dist = DistInfo(rank, 2, rank, torch.device("cpu"))
    settings = RunSettings.derive(recipe, dist)
    contexts, batches = [], []

    @contextlib.contextmanager
    def context():
        contexts.append(len(batches))
        yield

    def generate(prompts, n, sampling):
        batches.append(len(prompts))
        return [SimpleNamespace(samples=[Sample((5,), (0.0,), "\\boxed{1}", "stop")] * n) for _ in prompts]

    records = [SimpleNamespace(prompt_id=f"p{i}") for i in range(9)]
    parts = SimpleNamespace(settings=settings, stream=SimpleNamespace(records=records), generation_context=context,
                            prompts={r.prompt_id: r.prompt_id for r in records}, engine=SimpleNamespace(generate=generate))
    monkeypatch.setattr(reference_answers, "all_gather_objects", lambda mine: mine)
    shares = reference_answers.reference_shares(parts, dist, lambda *lines: None)
    assert len(contexts) == 1 and sum(batches) == prompts and max(batches) == 2
    assert len(shares) == prompts and all(s == {"reference_share": 1.0} for s in shares.values())
