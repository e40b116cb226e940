"""`urlvr mcs`: the paper's §6 diagnostic ranks two tiny models with different priors.

The two priors: the embedded tiny model (its confidence partly tracks correctness: it answers a
fair share of held-out problems right) and the same model fine-tuned for a few steps to answer
every question with `\\boxed{0}` -- maximal confidence, no correctness, the far end of the
confidence-correctness misalignment that §6 says the Model Collapse Step detects. (A less-trained
build was tried first: on CPU budgets its collapse step under majority voting varied with the
seed and sometimes exceeded the cap, so it could not give a reliable test.)
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from urlvr.cli import main
from urlvr.commands.mcs import MCSResult, mcs_recipe, rank, run_mcs
from urlvr.models.tiny import IM_END, ensure_tiny_model, render_prompt

BASE = {
    "seed": 0,
    "data": {"source": {"kind": "arithmetic", "num_problems": 64, "seed": 5}},
    "rollout": {"max_new_tokens": 96},
    "trainer": {"prompts_per_step": 4},
    "optim": {"lr": 1e-4},
    "logging": {"console": False},
}


@pytest.fixture(scope="module")
def always_zero_model(tmp_path_factory) -> Path:
    """The tiny model after 25 SFT steps on `The answer is \\boxed{0}.` for every question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from urlvr.data.synthetic import arithmetic_problems

    source = ensure_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    target = tokenizer("The answer is \\boxed{0}." + IM_END, add_special_tokens=False)["input_ids"]
    records = arithmetic_problems(25 * 16, 1234)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.train()
        for step in range(25):
            prompts = [tokenizer(render_prompt(r.prompt), add_special_tokens=False)["input_ids"]
                       for r in records[step * 16 : (step + 1) * 16]]
            width = max(len(p) for p in prompts) + len(target)
            ids = torch.full((16, width), tokenizer.pad_token_id)
            labels = torch.full((16, width), -100)
            for row, prompt in enumerate(prompts):  # right padding: no real token attends to a pad
                ids[row, : len(prompt) + len(target)] = torch.tensor(prompt + target)
                labels[row, len(prompt) : len(prompt) + len(target)] = torch.tensor(target)
            logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    out = tmp_path_factory.mktemp("always_zero")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_mcs_command_ranks_the_aligned_prior_first(always_zero_model, tmp_path, capsys):
    recipe = tmp_path / "base.yaml"
    recipe.write_text(yaml.safe_dump(BASE))
    out = tmp_path / "mcs"
    tiny = str(ensure_tiny_model())
    assert main(["mcs", str(always_zero_model), tiny, "--recipe", str(recipe), "--steps", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("rank  model"):].splitlines()
    assert table[0].split()[:4] == ["rank", "model", "collapse_step", "stopped_by"] and table[1].startswith("1 ")
    rows = json.loads((out / "mcs.json").read_text())
    assert [r["model"] for r in rows] == [tiny, str(always_zero_model)]  # the aligned prior ranks first
    survivor, collapsed = rows
    assert survivor["collapse_step"] is None and survivor["steps_run"] == 6
    assert collapsed["stopped_by"] == "model_collapse" and collapsed["collapse_step"] <= 3
    assert collapsed["ground_truth_start"] == 0.0 and survivor["ground_truth_peak"] > 0.0
    assert all(r["response_tokens"] > 0 and r["wall_seconds"] > 0 for r in rows)
    with open(out / "mcs.csv") as f:
        assert [r["model"] for r in csv.DictReader(f)] == [tiny, str(always_zero_model)]
    # the diagnostic's settings reached the run: mini-batch of one prompt, 8 samples, majority vote
    resolved = yaml.safe_load(Path(survivor["run_dir"], "recipe.yaml").read_text())
    assert resolved["trainer"]["prompts_per_minibatch"] == 1 and resolved["rollout"]["group_size"] == 8
    assert [t["name"] for t in resolved["reward"]["terms"]] == ["majority_vote"]


def test_label_free_mcs_stops_at_proxy_saturation(always_zero_model, tmp_path):
    """Also: a folder holding an earlier mcs is refused, and --overwrite removes its runs (a model
    it ranked and this one does not must not stay beside the new table); a line per model is said."""
    from urlvr.recipe import RecipeError

    out = tmp_path / "mcs"
    (out / "old-model").mkdir(parents=True)
    (out / "old-model" / "metrics.jsonl").write_text("")
    (out / "mcs.json").write_text(json.dumps([{"rank": 1, "model": "old", "run_dir": str(out / "old-model")}]))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match=r"holds the output of an earlier `urlvr mcs` \(mcs.json, old-model\); "
                                          "pass --overwrite"):
        run_mcs([str(always_zero_model)], BASE, out, max_steps=6, labels=False)
    said: list[str] = []
    (result,) = run_mcs([str(always_zero_model)], BASE, out, max_steps=6, labels=False, overwrite=True, say=said.append)
    assert sorted(p.name for p in out.iterdir()) == sorted(["mcs.csv", "mcs.json", "notes.txt", Path(result.run_dir).name])
    assert said[0] == f"urlvr mcs: [1/1] {always_zero_model}: diagnostic run in {result.run_dir} (at most 6 steps)"
    assert said[1].startswith(f"urlvr mcs: [1/1] {always_zero_model}: collapsed at step 3 (")
    assert result.stopped_by == "proxy_saturation" and result.collapse_step == 3  # window 3: first full window
    assert result.ground_truth_start is None  # no oracle: no ground-truth columns


def test_a_bad_model_fails_before_deleting_or_running_and_a_later_failure_keeps_finished_rows(always_zero_model, tmp_path):
    """Breaker finding: `mcs --overwrite good /no/such/model` deleted the earlier mcs.json, ran the
    first model for minutes, then failed on the second and wrote no table at all."""
    from urlvr.recipe import RecipeError

    out = tmp_path / "mcs"
    out.mkdir()
    earlier = json.dumps([{"rank": 1, "model": "old", "run_dir": str(out / "old-model")}])
    (out / "mcs.json").write_text(earlier)
    said: list[str] = []
    with pytest.raises(RecipeError, match=r"^model.path '/no/such/model': no such folder"):
        run_mcs([str(always_zero_model), "/no/such/model"], BASE, out, max_steps=1, labels=False, overwrite=True,
                say=said.append)
    assert said == [] and (out / "mcs.json").read_text() == earlier and sorted(p.name for p in out.iterdir()) == ["mcs.json"]
    # a model named twice is the same run twice (same recipe, same seed): refused before anything
    with pytest.raises(RecipeError, match="listed more than once"):
        run_mcs([str(always_zero_model), str(always_zero_model)], BASE, out, max_steps=1, labels=False,
                overwrite=True, say=said.append)
    assert said == [] and (out / "mcs.json").read_text() == earlier
    broken = tmp_path / "broken"  # passes the up-front check (a folder with config.json), fails to load
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(RecipeError, match="cannot load it"):
        run_mcs([str(always_zero_model), str(broken)], BASE, out, max_steps=1, labels=False, overwrite=True,
                say=said.append)
    rows = json.loads((out / "mcs.json").read_text())
    assert [r["model"] for r in rows] == [str(always_zero_model)] and rows[0]["steps_run"] == 1


def test_mcs_recipe_and_ranking_rules(tmp_path):
    recipe = mcs_recipe({"trainer": {"micro_batch_size": 32}, "reward": {"oracle": "math_verify"}}, "m", tmp_path,
                        max_steps=50, labels=True)
    assert recipe["trainer"]["micro_batch_size"] == 8  # a micro-batch never exceeds one prompt's group
    assert recipe["trainer"]["prompts_per_step"] == 32 and recipe["reward"]["oracle"] == "math_verify"
    assert recipe["collapse"] == {"action": "stop", "detectors": []}

    def result(model, collapse, steps):
        return MCSResult(model, collapse, None, steps, 0, 0.0, None, None, None, "")

    ranked = rank([result("early", 5, 5), result("survivor-short", None, 10), result("late", 40, 40),
                   result("survivor", None, 50)])
    assert [r.model for r in ranked] == ["survivor", "survivor-short", "late", "early"]
