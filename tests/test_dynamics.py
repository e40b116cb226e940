"""Training-dynamics metrics (paper App. B.2) against hand-computed values, and in a real run."""

from __future__ import annotations

import json
import math

import pytest
import torch

import urlvr
from conftest import small_run_recipe
from urlvr.metrics import dynamics

NAN = float("nan")


# --------------------------------------------------------------------------- pure formulas
def test_label_metrics_by_hand():
    # prompt 0: answers 7 7 7 3, label 7  -> majority right; prompt 1: 5 5 2 None, label 2 -> wrong
    # prompt 2: unlabelled (NaN oracle row) -> ignored by every label metric
    proxy = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    oracle = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], [NAN] * 4])
    majority_correct = torch.tensor([1.0, 0.0, NAN], dtype=torch.float64)
    m = dynamics.label_metrics(proxy, oracle, majority_correct, family="verdict")
    assert m["reward/ground_truth_mean"] == pytest.approx(4 / 8)
    assert m["dynamics/label_accuracy"] == pytest.approx(1 / 2)
    # agreement per sample: prompt 0: 4/4; prompt 1: (1,0) (1,0) (0,1) (0,0) -> 1/4
    assert m["dynamics/reward_accuracy"] == pytest.approx(5 / 8)
    assert m["dynamics/labelled_prompts"] == 2.0
    assert "dynamics/top_reward_label_accuracy" not in m and "dynamics/reward_correctness_corr" not in m
    m = dynamics.label_metrics(proxy, oracle, majority_correct, family="certainty")
    assert "dynamics/reward_accuracy" not in m and m["dynamics/label_accuracy"] == pytest.approx(1 / 2)
    # highest-reward sample (first on ties): prompt 0 sample 0 right, prompt 1 sample 0 wrong
    assert m["dynamics/top_reward_label_accuracy"] == pytest.approx(1 / 2)
    x, y = proxy[:2].flatten().double(), oracle[:2].flatten().double()
    pearson = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    assert m["dynamics/reward_correctness_corr"] == pytest.approx(pearson, abs=1e-12)


def test_label_metrics_absent_without_labels():
    proxy = torch.ones(2, 3)
    for family in ("verdict", "certainty", "other"):
        assert dynamics.label_metrics(proxy, None, torch.full((2,), NAN), family=family) == {}
        assert dynamics.label_metrics(proxy, torch.full((2, 3), NAN), torch.full((2,), NAN), family=family) == {}


def test_correlation_absent_when_undefined():
    proxy = torch.tensor([[0.3, 0.7]])
    m = dynamics.label_metrics(proxy, torch.tensor([[1.0, 1.0]]), torch.tensor([1.0]), family="certainty")  # all right
    assert "dynamics/reward_correctness_corr" not in m and m["dynamics/label_accuracy"] == 1.0
    assert dynamics.point_biserial(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0])) is None  # constant score


def test_point_biserial_formula():
    scores, correct = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    # M1 = 4.5, M0 = 1.5, population std = sqrt(3.5), n1 = n0 = 2, n = 4
    expected = (4.5 - 1.5) / math.sqrt(3.5) * math.sqrt(2 * 2) / 4
    assert dynamics.point_biserial(scores, correct) == pytest.approx(expected, abs=1e-12)


def test_majority_ratio_ties_and_empty_answers():
    voters = [("3", "4", "4", "3"), (None, None, None, None), ("5", None, None, None), ("1", "2", "3", "1")]
    p_maj = dynamics.majority_ratios(voters)
    # tie 3/4 goes to "3" (seen first): 2/4; nobody answered: 0; lone answer: 1/4 (abstainers count)
    assert p_maj.tolist() == [0.5, 0.0, 0.25, 0.5]


def test_majority_correctness_follows_the_oracle():
    voters = answers = [("3", "4", "4", "3"), (None, None), ("0.5", "0.5")]
    labels = ["4", "1", "1/2"]
    # the oracle says "0.5" is right for label "1/2" (a math-verify-like equivalence); ties go to "3"
    oracle = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, NAN, NAN], [1.0, 1.0, NAN, NAN]])[:, :4]
    oracle = [oracle[0], oracle[1, :2], oracle[2, :2]]
    out = [dynamics.majority_correctness([v], [a], o[None], [lab]).item()
           for v, a, o, lab in zip(voters, answers, oracle, labels)]
    assert out == [0.0, 0.0, 1.0]  # tie -> "3" wrong; no answer -> wrong; equivalent answer -> right
    unlabelled = dynamics.majority_correctness([("1",)], [("1",)], torch.tensor([[NAN]]), [None])
    assert math.isnan(unlabelled.item())


def test_majority_correctness_uses_extra_voters():
    # the trained samples never gave the majority answer "9" (only the extra voters did): string check
    voters, answers = [("9", "9", "9", "2")], [("2",)]
    assert dynamics.majority_correctness(voters, answers, torch.tensor([[0.0]]), ["9"]).item() == 1.0
    assert dynamics.majority_correctness(voters, answers, torch.tensor([[0.0]]), ["8"]).item() == 0.0


def test_repetition_rate():
    assert dynamics.repetition_rate([1, 2, 3, 1, 2, 3], 3) == pytest.approx(1 - 3 / 4)
    assert dynamics.repetition_rate([5, 5, 5, 5], 1) == pytest.approx(1 - 1 / 4)
    assert dynamics.repetition_rate([1, 2, 3, 4], 2) == 0.0
    assert dynamics.repetition_rate([1, 2], 4) == 0.0  # shorter than n: nothing can repeat
    assert dynamics.repetition_rate([], 4) == 0.0


def test_kl_k3():
    logp = torch.log(torch.tensor([0.5, 0.25]))
    ref = torch.log(torch.tensor([0.25, 0.25]))
    k3 = dynamics.kl_k3(logp, ref)
    assert k3[0].item() == pytest.approx(0.5 - math.log(0.5) - 1) and k3[1].item() == 0.0
    assert bool((dynamics.kl_k3(torch.randn(50), torch.randn(50)) >= 0).all())


# --------------------------------------------------------------------------- each metric for its family
def _reference_label_metrics(scores, gt, family):
    """App. B.2 from the formulas, in float64 Python loops: scores, gt are lists of per-prompt lists."""
    M, N = len(scores), len(scores[0])
    out = {}
    if family == "verdict":  # Eq. 40 with r in {0, 1}: 1[r_mv = r_gt]
        out["dynamics/reward_accuracy"] = sum(float(scores[i][j] == gt[i][j]) for i in range(M) for j in range(N)) / (M * N)
    if family == "certainty":  # Eq. 43: j* = argmax_j r_cert (first on ties); Pearson r of (r, r_gt) pooled
        top = 0.0
        for i in range(M):
            best = 0
            for j in range(1, N):
                if scores[i][j] > scores[i][best]:
                    best = j
            top += gt[i][best]
        out["dynamics/top_reward_label_accuracy"] = top / M
        xs = [float(x) for row in scores for x in row]
        ys = [float(y) for row in gt for y in row]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
        vx, vy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
        if vx > 0 and vy > 0:
            out["dynamics/reward_correctness_corr"] = cov / math.sqrt(vx * vy)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_label_metrics_match_the_papers_formulas_for_each_family(seed):
    gen = torch.Generator().manual_seed(seed)
    M, N = 5, 6
    gt = (torch.rand(M, N, generator=gen) < 0.4).double()
    verdicts = (torch.rand(M, N, generator=gen) < 0.5).double()  # a majority-vote-like 0/1 pseudo-reward
    entropy = -torch.rand(M, N, generator=gen, dtype=torch.float64) * 3  # trajectory_entropy: always < 0
    majority_correct = torch.zeros(M, dtype=torch.float64)
    label_keys = ("dynamics/reward_accuracy", "dynamics/top_reward_label_accuracy", "dynamics/reward_correctness_corr")
    for family, scores in (("verdict", verdicts), ("certainty", entropy), ("other", entropy)):
        got = dynamics.label_metrics(scores, gt, majority_correct, family=family)
        want = _reference_label_metrics(scores.tolist(), gt.tolist(), family)
        assert {k: v for k, v in got.items() if k in label_keys} == pytest.approx(want, abs=1e-12), family


def test_an_all_correct_batch_under_a_certainty_reward_is_not_a_collapse():
    """The failure this guards: Eq. 40 on an entropy reward (< 0.5 always) gave 0.0 here, and the
    Model Collapse Step fired at step 1."""
    from urlvr.metrics.collapse import CollapseMonitor
    from urlvr.recipe import load_recipe

    entropy = -torch.rand(4, 8, dtype=torch.float64) - 0.1
    m = dynamics.label_metrics(entropy, torch.ones(4, 8), torch.ones(4, dtype=torch.float64), family="certainty")
    assert "dynamics/reward_accuracy" not in m and m["dynamics/top_reward_label_accuracy"] == 1.0
    monitor = CollapseMonitor(load_recipe({}).collapse)
    assert monitor.observe(1, m) == [] and monitor.collapse_step is None
    wrong = dynamics.label_metrics(entropy, torch.zeros(4, 8), torch.zeros(4, dtype=torch.float64), family="certainty")
    (alarm,) = monitor.observe(2, wrong)
    assert (alarm.detector, alarm.metric, monitor.collapse_step) == ("model_collapse", "dynamics/top_reward_label_accuracy", 2)
    assert monitor.summary()["model_collapse_metric"] == "dynamics/top_reward_label_accuracy"


def test_reward_family_of_a_recipes_terms():
    from urlvr.rewards.compose import reward_family

    assert reward_family([("majority_vote", 1.0)]) == ("verdict", 0)
    assert reward_family([("trajectory_entropy", 1.0), ("majority_vote", 2.0)]) == ("certainty", None)
    assert reward_family([("trajectory_entropy", 0.0), ("majority_vote", 2.0)]) == ("verdict", 1)  # weight 0: not counted
    assert reward_family([("majority_vote", 1.0), ("format", 0.1)]) == ("certainty", None)  # a sum is graded
    assert reward_family([("majority_vote", -1.0)]) == ("certainty", None)  # a negated verdict is no verdict
    assert reward_family([("self_certainty", 1.0)]) == ("certainty", None)
    assert reward_family([("format", 1.0)]) == ("other", None)


# --------------------------------------------------------------------------- in a run
def test_run_logs_kl_tracking_and_label_metrics(random_tiny_model, tmp_path):
    tracked = ["arithmetic-s3-000001", "arithmetic-s3-000002", "arithmetic-s3-000003"]
    recipe = small_run_recipe(  # 8 prompts, 2 steps of 4: every prompt is rolled out once
        random_tiny_model[0], tmp_path / "run", data={"source": {"kind": "arithmetic", "num_problems": 8, "seed": 3}},
        trainer={"total_steps": 2, "prompts_per_step": 4, "prompts_per_minibatch": 4, "micro_batch_size": 8,
                 "save_every": 0, "export_final_model": False},
        dynamics={"kl_to_initial_every": 2, "track_prompts": tracked, "greedy_every": 2},
    )
    result = urlvr.train(recipe)
    first, second = result.metrics
    assert "actor/kl_to_initial" not in first  # measured every 2 steps only
    assert second["actor/kl_to_initial"] > 0.0  # one update with lr 1e-3 moved the policy
    for m in result.metrics:
        assert 0.0 <= m["response/repetition_rate"] <= 1.0 and 0.0 <= m["dynamics/majority_ratio"] <= 1.0
        assert m["dynamics/labelled_prompts"] == 4.0 and 0.0 <= m["dynamics/reward_accuracy"] <= 1.0
        assert "dynamics/top_reward_label_accuracy" not in m  # majority vote is a verdict: Eq. 40, not Eq. 43
    rows = [json.loads(line) for line in (result.run_dir / "prompts.jsonl").read_text().splitlines()]
    greedy = [r for r in rows if r["kind"] == "greedy"]
    assert sorted((r["step"], r["prompt_id"]) for r in greedy) == [(s, q) for s in (0, 2) for q in tracked]
    assert all(isinstance(r["correct"], bool) and 0.0 < r["confidence"] <= 1.0 for r in greedy)
    rollout = [r for r in rows if r["kind"] == "rollout"]
    assert sorted(r["prompt_id"] for r in rollout) == tracked and {r["step"] for r in rollout} <= {1, 2}
    assert all(isinstance(r["majority_correct"], bool) and 0.0 <= r["p_maj"] <= 1.0 for r in rollout)


def test_no_labels_means_absent_label_metrics(random_tiny_model, tmp_path):
    recipe = small_run_recipe(random_tiny_model[0], tmp_path / "run",
                              trainer={"total_steps": 1, "save_every": 0, "export_final_model": False},
                              reward={"terms": [{"name": "majority_vote"}], "oracle": None})
    (m,) = urlvr.train(recipe).metrics
    assert not any(k.startswith(("dynamics/label", "dynamics/reward_acc", "reward/ground_truth")) for k in m)
    assert "dynamics/majority_ratio" in m and "response/repetition_rate" in m


@pytest.mark.parametrize("reward, logged, absent", [
    ("trajectory_entropy", "dynamics/top_reward_label_accuracy", "dynamics/reward_accuracy"),
    ("majority_vote", "dynamics/reward_accuracy", "dynamics/top_reward_label_accuracy"),
    ("format", None, "dynamics/reward_accuracy"),
])
def test_a_run_logs_each_label_metric_only_for_its_reward_family(reward, logged, absent, random_tiny_model, tmp_path):
    recipe = small_run_recipe(random_tiny_model[0], tmp_path / "run",
                              trainer={"total_steps": 1, "save_every": 0, "export_final_model": False},
                              reward={"terms": [{"name": reward}], "oracle": "ground_truth"})
    result = urlvr.train(recipe)
    (m,) = result.metrics
    assert absent not in m and "dynamics/label_accuracy" in m and "reward/ground_truth_mean" in m
    if logged is None:
        assert "dynamics/top_reward_label_accuracy" not in m
    else:
        assert 0.0 <= m[logged] <= 1.0
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["model_collapse_metric"] == logged
