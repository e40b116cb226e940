"""`urlvr probe`: the alignment metrics by hand, the command end to end on the two tiny priors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
import torch

from urlvr.metrics import alignment


def test_auroc_by_hand_with_ties():
    scores = torch.tensor([0.9, 0.5, 0.5, 0.1])
    correct = torch.tensor([1.0, 1.0, 0.0, 0.0])
    # pairs (correct, wrong): (0.9,0.5)=1 (0.9,0.1)=1 (0.5,0.5)=1/2 (0.5,0.1)=1 -> 3.5 / 4
    assert alignment.auroc(scores, correct) == pytest.approx(0.875)
    assert alignment.auroc(scores, torch.ones(4)) is None
    assert alignment.auroc(-scores, correct) == pytest.approx(0.125)


def test_group_auroc_skips_one_class_groups():
    scores = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.5, 0.5]])
    correct = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    assert alignment.group_auroc(scores, correct) == pytest.approx(0.5)  # (1 + 0) / 2; the third has no wrong sample


def test_advantage_correctness_is_cov_over_std_for_grpo():
    from urlvr.algorithms.advantages import ADVANTAGE_ESTIMATORS

    rewards = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    correct = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    advantages = ADVANTAGE_ESTIMATORS.get("grpo")(rewards, eps=0.0)
    # mean_j A_ij c_ij = Cov_j(r, c) / std_j(r) (GRPO's std is the unbiased one); then the mean over groups
    expected = sum(float(((r - r.mean()) * (c - c.mean())).mean() / r.std()) for r, c in zip(rewards, correct)) / 2
    assert alignment.advantage_correctness(advantages, correct) == pytest.approx(expected)
    assert alignment.expected_direction(0.6) == "rise" and alignment.expected_direction(0.5) == "fall"


def test_undetermined_below_each_threshold_by_hand():
    correct = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    assert alignment.mixed_groups(correct) == 2  # rows 0 and 3 hold both
    assert alignment.undetermined_reason(16, 0.5, 4) is None  # every threshold met exactly
    few = alignment.undetermined_reason(15, 0.5, 4)
    assert few.startswith("15 labelled prompts") and ";" not in few
    silent = alignment.undetermined_reason(16, 1 / 16, 4)
    assert "answers extracted from 6% of the samples" in silent
    flat = alignment.undetermined_reason(4, 0.9, 0)
    assert "4 labelled prompts" in flat and "0 groups hold both a right and a wrong sample" in flat


def test_p_maj_histogram_splits_by_majority_correctness():
    hist = alignment.p_maj_histogram(torch.tensor([0.25, 0.5, 0.5, 1.0]), torch.tensor([0.0, 1.0, float("nan"), 1.0]), 4)
    assert hist["p_maj"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert hist["correct"] == [0, 0, 1, 0, 1] and hist["wrong"] == [0, 1, 0, 0, 0] and hist["unlabelled"] == [0, 0, 1, 0, 0]


PROBE_BASE = {"seed": 0, "data": {"source": {"kind": "arithmetic", "num_problems": 64, "seed": 1}},
              "rollout": {"group_size": 8, "max_new_tokens": 80}}


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """Both tiny priors probed once: 64 prompts x 8 samples each (about 15 s on 2 idle cores).
    Measured: majority right on 0.297 (urlvr/tiny) and 0.578 (urlvr/tiny-aligned) of these prompts;
    on the first 32 alone the aligned prior's is 0.5 or less, so 64 is the smallest safe size."""
    from urlvr.commands.probe import run_probe

    out = tmp_path_factory.mktemp("probe")
    results = run_probe(["urlvr/tiny", "urlvr/tiny-aligned"], PROBE_BASE, out,
                        rewards=["majority_vote", "self_certainty", "trajectory_entropy"], num_prompts=64, progress=False)
    return out, results


def test_probe_table_never_cuts_a_model_or_reward_name(probed, capsys):
    """Two models' rows must be told apart: the names print whole (they were cut to `urlvr/ti…`)."""
    from urlvr.commands.probe import print_table

    print_table(probed[1])
    lines = capsys.readouterr().out.splitlines()
    for model in ("urlvr/tiny ", "urlvr/tiny-aligned "):
        for reward in ("majority_vote ", "self_certainty ", "trajectory_entropy "):
            assert any(model in line and reward in line for line in lines), (model, reward)


def test_probe_says_when_verifications_ran_out_of_time(probed, capsys):
    """A verification out of time scores as wrong (issue 19, item 3): the probe says how many."""
    from dataclasses import replace

    from urlvr.commands.probe import RewardProbe, print_table

    _, (weak, _) = probed
    assert weak.oracle_timeouts is None and all(r.timeouts is None for r in weak.rewards)  # no time-limited reward
    print_table([weak])
    assert "ran out of time" not in capsys.readouterr().out
    timed = replace(weak, oracle_timeouts=2, rewards=weak.rewards + (RewardProbe("math_verify", 0.5, 0.0, timeouts=1),))
    print_table([timed])
    assert "urlvr: 3 verifications ran out of time and were scored as wrong" in capsys.readouterr().out


def test_probe_predicts_fall_for_the_weak_prior_and_rise_for_the_aligned_one(probed):
    _, (weak, aligned) = probed
    by_reward = {r.reward: r for r in weak.rewards}
    assert by_reward["majority_vote"].direction == "fall"
    assert {r.reward: r for r in aligned.rewards}["majority_vote"].direction == "rise"
    assert aligned.majority_correct > 0.5 > weak.majority_correct
    assert weak.undetermined is None and aligned.undetermined is None  # 64 prompts: enough to tell
    for result in (weak, aligned):
        vote = {r.reward: r for r in result.rewards}["majority_vote"]
        assert vote.top_reward_accuracy == pytest.approx(result.majority_correct)  # the top vote is the majority
        assert vote.reward_accuracy is not None  # 0/1 reward
        assert {r.reward: r for r in result.rewards}["self_certainty"].reward_accuracy is None  # not 0/1
        assert sum(sum(result.p_maj_histogram[k]) for k in ("correct", "wrong")) == result.labelled_prompts == 64


def test_a_probe_of_a_handful_of_prompts_says_it_cannot_tell(tmp_path, capsys):
    """8 prompts: whatever the top-reward accuracy, the direction is `undetermined` and says why
    (it printed `fall` or `rise` from a handful of answers)."""
    from urlvr.commands.probe import print_table, run_probe

    (result,) = run_probe(["urlvr/tiny"], PROBE_BASE, rewards=["majority_vote"], num_prompts=8, group_size=4,
                          progress=False)
    assert result.labelled_prompts == 8 and result.rewards[0].top_reward_accuracy is not None
    assert result.rewards[0].direction == "undetermined"
    assert result.undetermined.startswith("8 labelled prompts (a direction needs >= 16)")
    print_table([result])
    assert "urlvr/tiny: direction undetermined: 8 labelled prompts" in capsys.readouterr().out
    print_table([result], rank=True)  # ranked: no rank number, the reason once under the table
    ranked_view = capsys.readouterr().out
    assert "│    - │ majority_vote │" in ranked_view and "│ undetermined │ see below" in ranked_view
    assert "urlvr/tiny: direction undetermined: 8 labelled prompts" in ranked_view


def test_probe_writes_json_csv_and_one_png_per_model(probed):
    out, results = probed
    saved = json.loads((out / "probe.json").read_text())
    assert [m["model"] for m in saved] == ["urlvr/tiny", "urlvr/tiny-aligned"]
    rows = list(csv.DictReader(open(out / "probe.csv")))
    assert len(rows) == 2 * 3 and {"auroc", "direction", "majority_correct"} <= set(rows[0])
    assert sorted(p.name for p in out.glob("*.png")) == ["urlvr__tiny-aligned.png", "urlvr__tiny.png"]


def test_probe_without_labels_reports_label_free_quantities_only(tmp_path, capsys):
    from urlvr.commands.probe import print_table, run_probe

    rows = [{"prompt": f"Compute {a}+{a + 1}."} for a in range(4)]
    data = tmp_path / "unlabelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {**PROBE_BASE, "data": {"source": {"kind": "file", "path": str(data), "label_field": None}}}
    (result,) = run_probe(["urlvr/tiny"], base, rewards=["majority_vote"], num_prompts=4, group_size=4, progress=False)
    assert result.labelled_prompts == 0 and result.sample_accuracy is None
    assert result.rewards[0].auroc is None and result.rewards[0].direction is None
    print_table([result])
    assert "urlvr mcs" in capsys.readouterr().out


def test_training_the_weak_prior_falls_as_the_probe_predicts(tmp_path):
    """The training half for `urlvr/tiny` (probe: `fall`): 16 quickstart steps of majority vote
    (about 25 s). Mean ground truth of steps 1-4 minus steps 13-16, measured with seeds 0 / 1 / 2:
    0.125 / 0.082 / 0.133; with lr 1e-9 (no learning, seed 0) -0.051. Swept again under the
    inverse-CDF sampler of commit 14abf5d: the 8 steps of before (steps 1-3 minus 6-8, which fell
    0.07 / 0.13 / 0.13 under the exponential race) fell only 0.02 / 0.02 / 0.03, since step 6's
    prompts happen to be easy (0.31 on seed 0), so the run and its windows are longer now.
    The aligned prior's `rise` has no such half: its ground truth does not rise in training
    (docs/probe.md, "What the rule does not say"); tests/test_dataset_size.py trains it."""
    import yaml

    import urlvr

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml").read_text())
    recipe.update(output_dir=str(tmp_path / "run"), logging={"console": False})
    recipe["trainer"].update(total_steps=16, save_every=0, export_final_model=False)
    curve = [m["reward/ground_truth_mean"] for m in urlvr.train(recipe).metrics]
    assert sum(curve[:4]) / 4 - sum(curve[-4:]) / 4 > 0.05, curve


def test_probe_ignores_the_training_batch_shape_and_names_the_recipe_file():
    """A training recipe's micro-batch (64 sequences) must not refuse a probe with a small group
    (nothing is trained), and a bad field is reported against the recipe file, not `<dict>`."""
    from urlvr.commands.probe import probe_model, probe_recipe
    from urlvr.recipe import RecipeError, load_recipe

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml").read_text())
    recipe = load_recipe(probe_recipe(base, "urlvr/tiny", ["majority_vote"], group_size=2))
    assert recipe.trainer.micro_batch_size <= recipe.trainer.prompts_per_minibatch * recipe.rollout.group_size
    with pytest.raises(RecipeError, match=r"^quickstart.yaml \(probing urlvr/tiny\): optim.lr"):
        probe_model("urlvr/tiny", {**base, "optim": {"lr": -1.0}}, ["majority_vote"], origin="quickstart.yaml")


def test_probe_refuses_an_earlier_probes_folder_and_overwrite_leaves_no_stale_png(tmp_path):
    """A second probe into a folder used to leave the PNG of a model it did not probe beside its
    own results. Now: refused (one line, before any model loads) unless --overwrite, which removes
    the probe's own files only. Run as a user runs it, output to a file: progress lines show there."""
    import os
    import subprocess
    import sys

    from urlvr.cli import main

    recipe = tmp_path / "base.yaml"
    recipe.write_text(yaml.safe_dump(PROBE_BASE))
    out = tmp_path / "probe"
    out.mkdir()
    for name in ("urlvr__tiny-aligned.png", "notes.txt", "my_plot.png"):  # the last one is the user's own
        (out / name).write_text("earlier")
    (out / "probe.json").write_text(json.dumps([{"model": "urlvr/tiny-aligned",
                                                 "figure": str(out / "urlvr__tiny-aligned.png")}]))
    args = ["probe", "urlvr/tiny", "--recipe", str(recipe), "--prompts", "8", "--group-size", "2",
            "--reward", "majority_vote", "--out", str(out)]
    assert main(args) == 2
    assert (out / "urlvr__tiny-aligned.png").read_text() == "earlier"  # nothing touched
    log = tmp_path / "probe.log"
    repo = Path(__file__).resolve().parents[1]
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # this process's world
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["PYTHONPATH"] = os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])
    with open(log, "w") as handle:  # neither stdout nor stderr is a terminal
        done = subprocess.run([sys.executable, "-m", "urlvr.cli", *args, "--overwrite"], stdout=handle,
                              stderr=subprocess.STDOUT, env=env, timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text
    # the earlier probe's PNG is gone; the user's own PNG (no probe.json names it) stays (a breaker lost one)
    assert sorted(p.name for p in out.iterdir()) == ["my_plot.png", "notes.txt", "probe.csv", "probe.json",
                                                     "urlvr__tiny.png"]
    assert "urlvr probe: sampling urlvr/tiny, 2 samples per prompt: 8 prompts\n" in text
    assert "urlvr probe: sampling urlvr/tiny, 2 samples per prompt: 8/8 prompts (100%), " in text


def test_probe_refusal_names_the_earlier_files(tmp_path):
    from urlvr.commands.probe import run_probe
    from urlvr.recipe import RecipeError

    (tmp_path / "urlvr__tiny.png").write_bytes(b"")
    with pytest.raises(RecipeError) as info:
        run_probe(["urlvr/tiny"], PROBE_BASE, tmp_path, progress=False)
    assert str(info.value) == (f"{tmp_path}: holds the output of an earlier `urlvr probe` (urlvr__tiny.png); "
                               "pass --overwrite to replace it, or --out a new folder")


def test_probe_refuses_what_it_would_misread_before_sampling(tmp_path):
    """`--set reward.terms.N...` indexed the probe's own term list (6 rewards), not the recipe's, and
    replaced a probed reward silently; `--out` naming a file failed only after sampling, with a bare
    FileExistsError (breaker findings). Both are one line before any model loads."""
    from urlvr.commands.probe import run_probe
    from urlvr.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"--set reward.terms.1.name=format: urlvr probe scores its own reward terms"):
        run_probe(["urlvr/tiny"], PROBE_BASE, overrides=["reward.terms.1.name=format"], num_prompts=4, progress=False)
    taken = tmp_path / "base.yaml"
    taken.write_text("seed: 0\n")
    with pytest.raises(RecipeError, match="is a file, not a folder"):
        run_probe(["urlvr/tiny"], PROBE_BASE, taken, num_prompts=4, progress=False)
    assert taken.read_text() == "seed: 0\n"


# --------------------------------------------------------------------------- the ranked view (--rank)
def test_rank_rewards_by_hand():
    """Best first by top-reward acc, ties by AUROC in group (None = chance, 0.5), then name;
    undetermined after every determined reward, with the reason; SE = sqrt(p (1 - p) / n)."""
    from urlvr.commands.probe import RewardProbe

    def probe(name, top, auroc, flat=0.0):
        return RewardProbe(name, 0.0, flat, top_reward_accuracy=top, group_auroc=auroc)

    rewards = [probe("a", 0.25, 0.9), probe("b", 0.75, 0.6), probe("c", 0.75, 0.7), probe("d", 0.25, None),
               probe("e", 0.9, 0.9, flat=1.0), probe("f", 0.25, 0.4)]
    ranked = alignment.rank_rewards(rewards, labelled_prompts=16)
    assert [(e.reward, e.rank) for e in ranked] == [("c", 1), ("b", 2), ("a", 3), ("d", 4), ("f", 5), ("e", None)]
    assert [e.direction for e in ranked] == ["rise", "rise", "fall", "fall", "fall", "undetermined"]
    assert ranked[0].standard_error == pytest.approx((0.75 * 0.25 / 16) ** 0.5)  # 0.108
    assert ranked[2].standard_error == pytest.approx((0.25 * 0.75 / 16) ** 0.5)
    assert ranked[-1].reason.startswith("constant in every group") and ranked[0].reason is None
    # the model cannot tell: every reward is undetermined, in the same order, with the model's reason
    shy = alignment.rank_rewards(rewards[:3], labelled_prompts=8, undetermined="8 labelled prompts")
    assert [(e.reward, e.rank, e.reason) for e in shy] == [(r, None, "8 labelled prompts") for r in ("c", "b", "a")]
    assert alignment.rank_rewards([probe("g", None, None)], 0)[0].reason.startswith("no labelled prompts")


def _lengths_probe(monkeypatch):
    """`urlvr probe` on urlvr/tiny with the sampling and the scoring pass replaced by 16 hand-made
    groups whose samples differ in length. Per prompt: sample 0 right, 4 tokens of log-prob -0.5
    (mean -0.5, sum -2.0); sample 1 wrong, 1 token of -1.0 (mean -1.0, sum -1.0); sample 2, 2 tokens
    of -0.9 (mean -0.9, sum -1.8), wrong like sample 1 on prompts 0-11 and right on 12-15. Padding
    scores 0.0, which would win every mean that counted it."""
    import urlvr.commands.probe as probe_module
    from urlvr.rollout.base import Group, Sample

    plan = {}  # prompt_id -> per-sample token log-probs

    def sample(engine, prompts, settings, **_):
        records = {r.prompt_id: r for r in probe_module_records(settings)}
        groups = []
        for index, prompt in enumerate(prompts):
            label = records[prompt.prompt_id].label
            third = label if index >= 12 else "-1"
            tokens = [[-0.5] * 4, [-1.0], [-0.9] * 2]
            texts = [f"\\boxed{{{label}}}", "\\boxed{-1}", f"\\boxed{{{third}}}"]
            plan[prompt.prompt_id] = tokens
            groups.append(Group(prompt, tuple(Sample(tuple(range(5, 5 + len(t))), tuple(t), text, "stop")
                                              for t, text in zip(tokens, texts))))
        return groups

    def score(hf_model, batch, settings, device):
        mask = batch.response_mask
        logprob = torch.zeros(mask.shape, dtype=torch.float32)  # padding: 0.0
        rows = [lp for prompt_id in plan for lp in plan[prompt_id]]  # the batch's rows: groups in prompt order
        for row, values in enumerate(rows):
            assert int(mask[row].sum()) == len(values)
            logprob[row, mask[row].bool()] = torch.tensor(values)
        names = set(settings.score_stats) | {f"raw_{n}" for n in settings.raw_score_stats}
        return {n: logprob if n.endswith("logprob") else torch.zeros_like(logprob) for n in names}

    def probe_module_records(settings):
        return settings.recipe.data.source.load()

    monkeypatch.setattr(probe_module, "_sample", sample)
    monkeypatch.setattr(probe_module, "_score", score)


def test_probe_rank_flag_orders_rewards_on_responses_of_different_lengths(tmp_path, monkeypatch, capsys):
    """--rank by hand (see `_lengths_probe`): trajectory_entropy's top sample (best mean) is sample 0,
    right on 16/16 prompts; majority_vote's is the first majority sample, right on 4/16;
    probability's (best product) is sample 1, right on 0/16; `format` is 1 everywhere (undetermined)."""
    from urlvr.cli import main

    _lengths_probe(monkeypatch)
    recipe = tmp_path / "base.yaml"
    recipe.write_text(yaml.safe_dump({**PROBE_BASE, "data": {"source": {"kind": "arithmetic", "num_problems": 16,
                                                                         "seed": 1}}}))
    out = tmp_path / "probe"
    args = ["probe", "urlvr/tiny", "--recipe", str(recipe), "--prompts", "16", "--group-size", "3", "--out", str(out),
            "--rank"]
    for name in ("probability", "majority_vote", "format", "trajectory_entropy"):
        args += ["--reward", name]
    assert main(args) == 0
    text = capsys.readouterr().out
    order = [name for line in text.splitlines() for name in ("trajectory_entropy", "majority_vote", "probability",
                                                               "format") if f" {name} " in line]
    assert order == ["trajectory_entropy", "majority_vote", "probability", "format"], text
    assert "urlvr: ranked by top-reward acc" in text and "paper Theorem 1" in text
    (saved,) = json.loads((out / "probe.json").read_text())
    ranked = [(e["reward"], e["rank"], e["top_reward_accuracy"], e["direction"]) for e in saved["ranked"]]
    assert ranked == [("trajectory_entropy", 1, 1.0, "rise"), ("majority_vote", 2, 0.25, "fall"),
                      ("probability", 3, 0.0, "fall"), ("format", None, 1.0, "undetermined")]
    assert saved["ranked"][1]["standard_error"] == pytest.approx((0.25 * 0.75 / 16) ** 0.5)
    assert saved["ranked"][0]["group_auroc"] == pytest.approx(1.0)
    assert saved["ranked"][3]["reason"].startswith("constant in every group")


def test_default_probe_covers_every_reward_that_applies_and_says_why_not_the_others(monkeypatch):
    """No --reward: every registered reward is probed (a reward registered later, as the zoo's are,
    included without editing probe), except oracles, rewards whose kwargs are refused, timed
    checkers and rewards whose batch phase generates with the policy, each with its reason."""
    from urlvr.commands.probe import default_rewards
    from urlvr.rewards.base import REWARDS, RewardSpec

    def fresh(group, ctx):
        return [0.0] * group.size

    def asks(groups, contexts, policy):
        policy.generate([])  # the PolicyHandle contract: every rank calls, even with nothing to ask
        return []

    def cheap(groups, contexts, policy):
        return [None] * len(groups)

    monkeypatch.setitem(REWARDS._entries, "zz_new", RewardSpec("zz_new", fresh, False, ""))
    monkeypatch.setitem(REWARDS._entries, "zz_prepared", RewardSpec("zz_prepared", fresh, False, "", prepare=cheap))
    monkeypatch.setitem(REWARDS._entries, "zz_generates", RewardSpec("zz_generates", fresh, False, "", prepare=asks))
    names, skipped = default_rewards({})
    assert set(names) | set(skipped) == set(REWARDS.names()) and not set(names) & set(skipped)
    assert {"zz_new", "zz_prepared", "majority_vote", "self_certainty", "token_entropy", "trajectory_entropy",
            "probability", "probability_disparity", "unified"} <= set(names)
    assert skipped["zz_generates"].startswith("asks the policy to generate")
    assert skipped["self_verification"].startswith("asks the policy to generate")
    assert skipped["ground_truth"].startswith("an oracle") and skipped["math_verify"].startswith("an oracle")
    assert "needs max_length" in skipped["overlong_penalty"]
    assert skipped["semantic_cluster"].startswith("verifies under a time limit")
    # the base recipe's kwargs decide: an exact-match clustering needs no checker, overlong_penalty its length
    names, skipped = default_rewards({"reward": {"terms": [
        {"name": "semantic_cluster", "kwargs": {"equivalence": "exact"}},
        {"name": "overlong_penalty", "kwargs": {"max_length": 80, "cache": 16}}]}})
    assert {"semantic_cluster", "overlong_penalty"} <= set(names)


def test_a_default_reward_that_raises_on_this_data_is_dropped_with_its_error(monkeypatch, capsys):
    """`countdown` on arithmetic problems (no numbers, no target) raised and stopped the probe;
    picked by default it is dropped, with the error, and the rest is measured. Named, it raises."""
    from urlvr.commands.probe import print_table, run_probe
    from urlvr.rewards.compose import RewardError

    _lengths_probe(monkeypatch)
    base = {**PROBE_BASE, "data": {"source": {"kind": "arithmetic", "num_problems": 16, "seed": 1}}}
    (result,) = run_probe(["urlvr/tiny"], base, num_prompts=16, group_size=3, progress=False)
    assert "countdown" not in {r.reward for r in result.rewards}
    assert result.skipped["countdown"].startswith("raised on this data (ValueError: countdown needs metadata fields")
    assert {"majority_vote", "trajectory_entropy", "probability"} <= {r.reward for r in result.rewards}
    print_table([result], rank=True)
    assert "urlvr: not probed: countdown: raised on this data" in capsys.readouterr().out
    with pytest.raises(RewardError, match="countdown"):
        run_probe(["urlvr/tiny"], base, rewards=["countdown"], num_prompts=16, group_size=3, progress=False)


def test_a_plugin_reward_that_reads_the_label_is_dropped_from_the_default_set(monkeypatch):
    """A user's plugin reward that is not an oracle and reads ctx.label anyway (a docs example
    registers one) stopped every default probe once registered; by default it is dropped with the
    reason, named it raises the leak as before."""
    from urlvr.commands.probe import run_probe
    from urlvr.rewards.base import REWARDS, LabelAccessError, reward

    _lengths_probe(monkeypatch)
    monkeypatch.setattr(REWARDS, "_entries", dict(REWARDS._entries))  # the registration leaves with the test
    reward("peeks_in_probe_test")(lambda group, ctx: [float(a == ctx.label) for a in ctx.answers])
    base = {**PROBE_BASE, "data": {"source": {"kind": "arithmetic", "num_problems": 16, "seed": 1}}}
    (result,) = run_probe(["urlvr/tiny"], base, num_prompts=16, group_size=3, progress=False)
    assert result.skipped["peeks_in_probe_test"].startswith("raised on this data (LabelAccessError:")
    assert "majority_vote" in {r.reward for r in result.rewards}
    with pytest.raises(LabelAccessError):
        run_probe(["urlvr/tiny"], base, rewards=["peeks_in_probe_test"], num_prompts=16, group_size=3, progress=False)
