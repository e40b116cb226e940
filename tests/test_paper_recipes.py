"""The shipped recipes: every file validates, the paper's settings are the paper's, and the
recipes run end to end on CPU with the embedded tiny model and the local dataset fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import urlvr
from urlvr.recipe import load_recipe
from urlvr.commands.sweep import load_sweep, validate_points

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
PAPER = RECIPES / "paper"


def is_sweep_spec(path: Path) -> bool:
    return "grid" in (yaml.safe_load(path.read_text()) or {})


def test_every_file_in_recipes_validates(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name paths relative to the repository root
    files = sorted(RECIPES.rglob("*.yaml"))
    recipes = [f for f in files if not is_sweep_spec(f)]
    sweeps = [f for f in files if is_sweep_spec(f)]
    assert len(recipes) >= 14 and len(sweeps) >= 9, (recipes, sweeps)
    for path in recipes:
        load_recipe(path)
    for path in sweeps:
        assert len(validate_points(load_sweep(path))) >= 2, path
    assert not [f for f in RECIPES.rglob("*") if f.is_file() and f.suffix != ".yaml"]


def test_paper_recipes_say_what_they_reproduce_and_what_to_expect():
    for path in sorted(PAPER.glob("*.yaml")):
        header = path.read_text().split("\nseed:")[0]
        assert header.startswith("# Reproduces: "), path.name
        assert any(ref in header.splitlines()[0] for ref in ("Fig.", "Table")), path.name
        assert "\n# Expect: " in header, path.name
    for path in sorted((PAPER / "sweeps").glob("*.yaml")):
        text = path.read_text()
        first = text.splitlines()[0]
        assert first.startswith("# ") and any(ref in first for ref in ("Fig", "Table", "§")), path.name
        assert "Expect" in text.split("\nrecipe:")[0], path.name


def test_paper_recipes_write_out_verls_weight_decay_on_every_parameter():
    """The paper trained with veRL, whose AdamW decays norm gains and biases too: each paper recipe
    says so itself, so a change of urlvr's default cannot change a reproduction."""
    for path in sorted(PAPER.glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["optim"]["weight_decay_exclude"] == "none", path.name


def recipe(name: str):
    return load_recipe(PAPER / f"{name}.yaml")


def test_rise_and_fall_is_table_7_and_evaluates_the_three_benchmarks():
    r = recipe("rise-and-fall")
    assert r.model.path == "Qwen/Qwen3-1.7B-Base" and r.data.source.dataset == "dapo-17k"
    assert (r.algorithm.advantage, r.rollout.temperature, r.trainer.prompts_per_step, r.trainer.prompts_per_minibatch,
            r.rollout.group_size, r.algorithm.kl_coef, r.algorithm.entropy_coef, r.data.max_prompt_length,
            r.rollout.max_new_tokens, r.optim.lr, r.trainer.data_epochs, r.trainer.total_steps) == \
        ("grpo", 1.0, 64, 64, 8, 0.0, 0.0, 1024, 7168, 1e-6, 1, None)
    assert [t.name for t in r.reward.terms] == ["majority_vote"] and r.reward.oracle == "ground_truth"
    benchmarks = [r.eval.source.dataset, *(s.dataset for s in r.eval.held_out.values())]
    assert benchmarks == ["aime-2024", "aime-2025", "amc-2023"]
    assert (r.eval.samples_per_prompt, r.eval.temperature, r.eval.top_p, r.eval.at_start) == (32, 0.6, 0.95, True)


def test_intrinsic_rewards_use_their_tuned_temperatures():
    tuned = {"rise-and-fall": ("majority_vote", 1.0), "intrinsic-self-certainty": ("self_certainty", 1.0),
             "intrinsic-token-entropy": ("token_entropy", 1.2), "intrinsic-trajectory-entropy": ("trajectory_entropy", 1.2),
             "intrinsic-probability": ("probability", 1.2)}
    base = recipe("rise-and-fall").model_dump(exclude={"output_dir", "rollout", "reward"})
    for name, (reward, temperature) in tuned.items():
        r = recipe(name)
        assert ([t.name for t in r.reward.terms], r.rollout.temperature) == ([reward], temperature), name
        assert r.model_dump(exclude={"output_dir", "rollout", "reward"}) == base, name  # otherwise Table 7


def test_sweeps_cover_appendix_b3_and_section_5():
    def grid(name):
        return [[label for label, _ in axis.choices] for axis in load_sweep(PAPER / "sweeps" / f"{name}.yaml").axes]

    assert grid("temperature") == [["0.6", "0.8", "1.0", "1.2"]]
    assert grid("mini-batch") == [["1", "8", "16", "32", "64"]]
    assert grid("kl") == [["off", "0.005"]]
    assert grid("rollouts") == [["4", "8", "16", "32"]]
    assert grid("dataset-size") == [["32", "128", "512", "2048", "8192", "16384"]]
    assert grid("dataset-size-seeds") == [["32", "128", "512"], ["0", "1", "2"]]
    assert grid("rise-and-fall") == [["majority_vote", "ground_truth"]]
    assert grid("countdown-prompts") == [["base", "instruct"], ["p1", "p2"]]


def test_section_5_6_7_and_table_9_settings():
    size = recipe("dataset-size")
    assert (size.trainer.total_steps, size.trainer.prompts_per_step, size.data.source.sample_size) == (600, 32, 512)
    test_time, train_time = recipe("test-time-amc23"), recipe("train-time-dapo")
    assert test_time.mode == "test_time" and test_time.data.source.dataset == "amc-2023"
    assert test_time.trainer.prompts_per_step == train_time.trainer.prompts_per_step == 40
    assert train_time.data.source.dataset == "dapo-17k"
    mcs = recipe("mcs")
    assert (mcs.trainer.prompts_per_minibatch, mcs.rollout.group_size, mcs.trainer.prompts_per_step) == (1, 8, 32)
    assert (mcs.collapse.action, mcs.collapse.reward_accuracy_threshold, mcs.collapse.detectors) == ("stop", 0.01, [])
    sv = recipe("countdown-self-verification")
    assert sv.data.source.dataset == "countdown-3to4" and sv.data.source.sample_size == 4000
    assert sv.reward.terms[0].name == "self_verification" and sv.reward.terms[0].kwargs["prompt"] == "p2"
    assert (sv.reward.extractor, sv.reward.oracle) == ("countdown_answer", "countdown")
    for arm in ("countdown-self-verification", "countdown-trajectory-entropy", "countdown-oracle"):
        ev = recipe(arm).eval  # validation on the 1k problems after the 4k training ones
        assert (ev.judge, ev.source.sample_size, ev.source.sample_offset, ev.source.sample_seed) == ("countdown", 1000, 4000, 0)
    assert recipe("countdown-oracle").reward.terms[0].kwargs == {"format_score": 0.1, "allow_equals": False}
    ttrl = recipe("ttrl-aime24")
    assert ttrl.mode == "test_time" and ttrl.eval.source.dataset == "aime-2024"
    assert (ttrl.trainer.prompts_per_step, ttrl.trainer.total_steps, ttrl.rollout.group_size, ttrl.reward.vote_group_size,
            ttrl.eval.samples_per_prompt) == (30, 100, 32, 64, 32)


# --------------------------------------------------------------------------- CPU runs
def cpu_overrides(name: str, out: Path, directory: Path = PAPER) -> list[str]:
    """Shrink a shipped recipe to a few CPU steps: the embedded tiny model, every adapter pointed at
    its fixture, tiny batches. Everything else (rewards, extractor, oracle, mode, templates) stays."""
    r = load_recipe(directory / f"{name}.yaml")
    sets = [f"output_dir={out}", "model.path=urlvr/tiny", "model.gradient_checkpointing=false",
            "optim.deepspeed.zero_stage=0", "optim.deepspeed.precision=fp32", "optim.lr=1e-4",
            "rollout.group_size=2", "rollout.max_new_tokens=8", "data.max_prompt_length=480",
            "data.on_long_prompt=skip", "trainer.total_steps=2", "trainer.prompts_per_step=2",
            "trainer.prompts_per_minibatch=2", "trainer.micro_batch_size=4", "trainer.save_every=0",
            "trainer.export_final_model=false", "logging.console=false", "eval.samples_per_prompt=2",
            "eval.max_new_tokens=4", "eval.every_steps=0", "dynamics.kl_to_initial_every=0"]
    if r.reward.vote_group_size:
        sets.append("reward.vote_group_size=4")
    for index, term in enumerate(r.reward.terms):
        if term.name == "overlong_penalty":  # its ramp within the 8 tokens (beyond them it is inert: refused)
            sets.append(f"reward.terms.{index}.kwargs={{max_length: 8, cache: 4}}")
    sources = {"eval.source": r.eval.source, **{f"eval.held_out.{k}": v for k, v in r.eval.held_out.items()}}
    if "source" in r.data.model_fields_set and r.mode == "train":
        sources["data.source"] = r.data.source
    for where, source in sources.items():
        if source is not None and source.kind == "adapter":
            sets.append(f"{where}.path={FIXTURES / source.dataset}.jsonl")
            if source.sample_size:
                sets.append(f"{where}.sample_size=4")
            if source.sample_offset:
                sets.append(f"{where}.sample_offset=0")
    return sets


CPU_RUNS = {
    "rise-and-fall": [],
    "test-time-amc23": [],
    # the tiny model's 512 positions: the chat frame, and a short verification budget
    "countdown-self-verification": ["data.template=chat",
                                    "reward.terms=[{name: self_verification, kwargs: {prompt: p1, max_new_tokens: 4}}]"],
}


@pytest.mark.parametrize("name", sorted(CPU_RUNS))
def test_paper_recipe_runs_a_few_cpu_steps(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    result = urlvr.train(load_recipe(PAPER / f"{name}.yaml", cpu_overrides(name, tmp_path / "run") + CPU_RUNS[name]))
    assert [m["step"] for m in result.metrics] == [1, 2]
    rows = [json.loads(line) for line in (result.run_dir / "completions.jsonl").read_text().splitlines()]
    trained = {row["prompt_id"] for row in rows}
    expected_prefix = {"rise-and-fall": "dapo-17k-", "test-time-amc23": "amc-2023-",
                       "countdown-self-verification": "countdown-3to4-"}[name]
    assert trained and all(p.startswith(expected_prefix) for p in trained), trained
    # the oracle (ground_truth, or the countdown scorer) is measured beside the proxy reward
    assert all("reward/ground_truth_mean" in m and "dynamics/reward_accuracy" in m for m in result.metrics)
    if name == "rise-and-fall":  # the three benchmarks, before step 1 and after the last
        assert [e["step"] for e in result.evaluations] == [0, 2]
        assert {"eval/prompts", "eval/aime-2025/prompts", "eval/amc-2023/prompts"} <= set(result.evaluations[0])
        assert result.evaluations[0]["eval/amc-2023/prompts"] == 3.0
    if name == "countdown-self-verification":  # judged by the countdown scorer, before step 1 and after
        assert [e["step"] for e in result.evaluations] == [0, 2]
        assert all(0.0 <= e["eval/avg@2"] <= 1.0 and e["eval/prompts"] == 4.0 for e in result.evaluations)
    if name == "test-time-amc23":
        assert {e["eval/prompts"] for e in result.evaluations} == {3.0}  # trained on the set it evaluates


def test_real_model_recipes_say_what_they_show_and_run_two_steps_on_the_tiny_model(tmp_path, monkeypatch):
    """recipes/real/: the header says what the run shows, how long it runs and what it needs; on
    the tiny model (the real one is the real-model tier's) two steps train on single-digit sums."""
    monkeypatch.chdir(REPO)
    paths = sorted((RECIPES / "real").glob("*.yaml"))
    assert [p.name for p in paths] == ["smollm2-majority.yaml"]
    header = paths[0].read_text().split("\nseed:")[0]
    assert all(word in header for word in ("# Shows:", "# Runs:", "# Needs: pip install", "# Run: urlvr train"))
    overrides = ["model.path=urlvr/tiny", f"output_dir={tmp_path / 'run'}", "trainer.total_steps=2",
                 "trainer.prompts_per_step=2", "trainer.prompts_per_minibatch=2", "rollout.group_size=2", "trainer.micro_batch_size=4",
                 "logging.console=false", "trainer.save_every=0"]
    result = urlvr.train(load_recipe(paths[0], overrides))
    assert [m["step"] for m in result.metrics] == [1, 2]
    rows = [json.loads(line) for line in (result.run_dir / "completions.jsonl").read_text().splitlines()]
    assert rows and all(len(r["prompt"].split("+")) == 2 for r in rows if "prompt" in r)
