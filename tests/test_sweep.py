"""`urlvr sweep`: a grid of --set overrides over one recipe, each point in its own run directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import small_run_recipe
from urlvr.cli import main
from urlvr.recipe import RecipeError, load_recipe
from urlvr.commands.sweep import format_value, launch_lines, load_sweep, parse_grid_option, validate_points

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_temperature_sweep_print_is_the_launch_script(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["sweep", "recipes/paper/sweeps/temperature.yaml", "--print"]) == 0
    out = "runs/paper/rise-and-fall/temperature"
    lines = [f"urlvr train recipes/paper/rise-and-fall.yaml --set rollout.temperature={t} "
             f"--set output_dir={out}/temperature={t}" for t in ("0.6", "0.8", "1.0", "1.2")]
    plot = "urlvr plot " + " ".join(f"{out}/temperature={t}" for t in ("0.6", "0.8", "1.0", "1.2")) + f" --out {out}/plots"
    expected = ["# 4 runs of recipes/paper/rise-and-fall.yaml, then their overlay", *lines, plot]
    assert capsys.readouterr().out.splitlines() == expected


def test_print_with_a_launcher_another_recipe_and_shared_overrides(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["sweep", "recipes/paper/sweeps/kl.yaml", "--print", "--recipe", "recipes/paper/intrinsic-token-entropy.yaml",
                 "--set", "trainer.total_steps=10", "--launcher", "torchrun --nproc_per_node 8 -m urlvr.cli"]) == 0
    lines = capsys.readouterr().out.splitlines()
    out = "runs/paper/intrinsic-token-entropy/kl"
    assert lines[1] == ("torchrun --nproc_per_node 8 -m urlvr.cli train recipes/paper/intrinsic-token-entropy.yaml "
                        f"--set trainer.total_steps=10 --set algorithm.kl_coef=0.0 --set output_dir={out}/kl=off")
    assert lines[2].endswith("--set algorithm.kl_coef=0.005 --set algorithm.kl_estimator=k3 "
                             f"--set output_dir={out}/kl=0.005")


def test_grid_is_the_cartesian_product_first_axis_slowest(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"output_dir": str(tmp_path / "base")})
    spec = write(tmp_path / "s.yaml", {"recipe": "r.yaml", "set": ["trainer.total_steps=3"], "grid": {
        "rollout.group_size": [4, 8],
        "kl": {"off": {"algorithm.kl_coef": 0.0}, "on": {"algorithm.kl_coef": 0.01, "algorithm.kl_estimator": "k2"}},
    }})
    sweep = load_sweep(spec)
    assert sweep.recipe == recipe and sweep.out_dir == tmp_path / "base" / "s"
    points = validate_points(sweep)
    assert [p.name for p in points] == ["group_size=4,kl=off", "group_size=4,kl=on", "group_size=8,kl=off", "group_size=8,kl=on"]
    assert points[1].overrides == ("trainer.total_steps=3", "rollout.group_size=4", "algorithm.kl_coef=0.01",
                                   "algorithm.kl_estimator=k2", f"output_dir={tmp_path / 'base' / 's' / 'group_size=4,kl=on'}")
    resolved = load_recipe(recipe, points[1].overrides)
    assert (resolved.rollout.group_size, resolved.algorithm.kl_coef, resolved.algorithm.kl_estimator) == (4, 0.01, "k2")
    assert resolved.output_dir == points[1].run_dir and resolved.trainer.total_steps == 3


def test_grid_option_parses_yaml_values_and_keeps_brackets_whole(tmp_path):
    axis = parse_grid_option("rollout.stop_token_ids=[1,2],[3],[]")
    assert [values for _, values in axis.choices] == [{"rollout.stop_token_ids": v} for v in ([1, 2], [3], [])]
    write(tmp_path / "r.yaml", {"output_dir": str(tmp_path / "o")})
    sweep = load_sweep(tmp_path / "r.yaml", grid=["rollout.stop_token_ids=[1,2],[3],[]"])
    assert [p.name for p in sweep.points()] == ["stop_token_ids=_1_2_", "stop_token_ids=_3_", "stop_token_ids=__"]
    assert load_recipe(sweep.recipe, sweep.points()[0].overrides).rollout.stop_token_ids == [1, 2]
    with pytest.raises(RecipeError, match="expected section.field=value1,value2"):
        parse_grid_option("rollout.temperature")


def test_override_values_round_trip_through_yaml():
    for value in (0.6, 1e-06, 7, True, None, "chat", "0.5", "a: b", [{"name": "majority_vote"}], "line\nbreak"):
        assert yaml.safe_load(format_value(value)) == value, value


@pytest.mark.parametrize("spec, message", [
    ({"recipe": "r.yaml", "grid": {"rollout.temperature": [0.5]}, "sett": []}, "unknown sweep key 'sett'"),
    ({"grid": {"rollout.temperature": [0.5]}}, "a sweep spec needs `recipe:`"),
    ({"recipe": "r.yaml", "grid": {"rollout.temperature": []}}, "grid.rollout.temperature: no values"),
    ({"recipe": "r.yaml", "grid": {"kl": {"on": 0.1}}}, "grid.kl.on: a labelled point is a mapping"),
    ({"recipe": "r.yaml", "grid": {"rollout.temperature": [0.5, "0.5"]}}, "share the run directory name 'temperature=0.5'"),
    ({"recipe": "r.yaml", "grid": {"rollout.temperature": [0.5, 0]}}, "sweep point temperature=0: .*rollout.temperature: "
                                                                     "Input should be greater than 0"),
    ({"recipe": "r.yaml", "grid": {"algorithm.kl_coef": [0.0, 0.1], "kl": {"on": {"algorithm.kl_coef": 0.2}}}},
     r"algorithm.kl_coef is swept by two axes \('algorithm.kl_coef' and 'kl'\)"),
])
def test_bad_specs_fail_before_anything_runs(tmp_path, spec, message):
    write(tmp_path / "r.yaml", {})
    with pytest.raises(RecipeError, match=message):
        validate_points(load_sweep(write(tmp_path / "s.yaml", spec)))


@pytest.mark.parametrize("text, problem", [
    ("", "empty sweep spec or recipe file"),
    ("- rollout.temperature\n", "a sweep spec or recipe must be a mapping of sections, got a list"),
])
def test_an_empty_or_non_mapping_sweep_file_is_refused_naming_it(tmp_path, text, problem):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=f"^{re.escape(str(path))}: {re.escape(problem)}"):
        load_sweep(path, grid=["rollout.temperature=0.5,1.0"])


def test_a_sweep_spec_over_an_empty_recipe_is_refused_naming_the_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("")
    with pytest.raises(RecipeError, match=f"^{re.escape(str(tmp_path / 'r.yaml'))}: empty recipe file"):
        load_sweep(write(tmp_path / "s.yaml", {"recipe": "r.yaml", "grid": {"rollout.temperature": [0.5]}}))


def test_a_recipe_without_grid_is_refused(tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", {})
    assert main(["sweep", str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == f"urlvr: error: {recipe}: nothing to sweep: give a sweep spec with `grid:` or --grid field=v1,v2"


def test_two_point_sweep_runs_on_the_tiny_model(random_tiny_model, tmp_path, capsys):
    recipe = write(tmp_path / "tiny.yaml", small_run_recipe(
        random_tiny_model[0], tmp_path / "unused", trainer={"total_steps": 1, "export_final_model": False}))
    out = tmp_path / "sweep"
    args = ["sweep", str(recipe), "--grid", "rollout.temperature=0.7,1.3", "--out", str(out)]
    assert main(args) == 0
    for temperature in ("0.7", "1.3"):
        run = out / f"temperature={temperature}"
        assert json.loads((run / "summary.json").read_text())["steps"] == 1
        assert yaml.safe_load((run / "recipe.yaml").read_text())["rollout"]["temperature"] == float(temperature)
    assert (out / "plots" / "dynamics.png").is_file()
    assert not (tmp_path / "unused").exists()  # every point writes to its own directory
    capsys.readouterr()
    assert main(args) == 0  # again: both points are done, nothing is retrained
    said = capsys.readouterr().out
    assert said.count("finished earlier, skipped") == 2 and "training" not in said
    # another recipe over the same folder: refused before anything runs, naming each difference
    # (the finished points were skipped, and the overlay showed the old runs under the new names)
    assert main([*args, "--set", "rollout.group_size=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"urlvr: error: sweep point temperature=0.7: {out / 'temperature=0.7'} holds a run of "
                          "another recipe (recipe.yaml):\n  rollout.group_size: 4 -> 2\n")
    assert main([*args, "--set", "trainer.total_steps=2"]) == 0  # more steps: each point continues its run
    assert capsys.readouterr().out.count(": resuming in ") == 2
    assert json.loads((out / "temperature=1.3" / "summary.json").read_text())["steps"] == 2


def test_launch_lines_quote_what_the_shell_would_split(tmp_path):
    write(tmp_path / "r.yaml", {"output_dir": str(tmp_path / "o")})
    sweep = load_sweep(write(tmp_path / "s.yaml", {"recipe": "r.yaml", "grid": {"data.template": ["Q: {prompt} A:"]}}))
    line = launch_lines(sweep)[1]
    assert """--set 'data.template="Q: {prompt} A:"'""" in line  # YAML would read the bare text as a mapping
    assert load_recipe(sweep.recipe, sweep.points()[0].overrides).data.template == "Q: {prompt} A:"
