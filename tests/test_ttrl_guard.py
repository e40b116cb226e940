"""TTRL-Guard's per-step math (urlvr/algorithms/ttrl_guard.py) against an independent float64
reference written from docs/rewards.md's description of the paper's method (arXiv 2605.19444,
§3.2-3.4, as its public code implements it): multi-step scenarios with flips, ties, prompts nobody
answers, a group of one, all-equal answers and extra voters; then the wiring into the step
(`algorithm.advantage_shaping: ttrl_guard`) and its exact resume."""

from __future__ import annotations

import random

import pytest
import torch

from urlvr.algorithms.ttrl_guard import GuardSettings, PromptHistory, guard_step


class ReferenceGuard:
    """Plain-Python TTRL-Guard with the public code's defaults, state in dicts of lists."""

    def __init__(self, frs=True, mps=True, rcsu=True):
        self.frs, self.mps, self.rcsu = frs, mps, rcsu
        self.majorities, self.ratios = {}, {}
        self.flipped, self.active, self.calm, self.fired = {}, {}, {}, {}

    @staticmethod
    def vote(voters):
        counts = {}
        for a in voters:
            if a is not None:
                counts[a] = counts.get(a, 0) + 1
        best = None
        for a in voters:  # first seen wins a tie
            if a is not None and (best is None or counts[a] > counts[best]):
                best = a
        return (None, 0.0) if best is None else (best, counts[best] / len(voters))

    def window(self, pid):
        recent = self.ratios[pid][-5:]
        return sum(recent) / len(recent)

    def step(self, pids, voters, answers, adv, rng):
        G = len(adv[0])
        flips, ratios, majs = [], [], []
        for pid, v in zip(pids, voters):
            m, r = self.vote(v)
            self.majorities.setdefault(pid, []).append(m)
            self.ratios.setdefault(pid, []).append(r)
            h = self.majorities[pid]
            f = 1.0 if len(h) >= 2 and h[-1] != h[-2] else 0.0
            if f > 0.3:
                self.flipped[pid] = True
            flips.append(f), ratios.append(r), majs.append(m)
        weights = []
        for pid, f, r in zip(pids, flips, ratios):
            w = 1.0
            if self.frs:
                w = 1.0 - 0.5 * f
                if r > 0.6 and f > 0.3:
                    w *= 0.7
                if (not self.flipped.get(pid) and len(self.majorities[pid]) >= 5 and self.window(pid) > 0.6
                        and self.fired.get(pid, 0) < 5):
                    w *= 0.85
                    self.fired[pid] = self.fired.get(pid, 0) + 1
                w = max(0.1, w)
            weights.append(w)
        keep, skipped, cap = [], 0, max(1, int(len(pids) * 0.25))
        for pid in pids:
            k = 1.0
            if self.rcsu and self.flipped.get(pid) and len(self.majorities[pid]) >= 5 and self.window(pid) > 0.7:
                if rng.random() < 0.7 and skipped < cap:
                    k, skipped = 0.0, skipped + 1
            keep.append(k)
        out = [[a * w * k for a in row] for row, w, k in zip(adv, weights, keep)]
        if not self.mps:
            return out
        for i, (pid, f, m) in enumerate(zip(pids, flips, majs)):
            if f > 0.3:
                self.active[pid], self.calm[pid] = True, 0
            elif self.active.get(pid):
                self.calm[pid] += 1
                if self.calm[pid] >= 3:
                    self.active[pid] = False
            if not self.active.get(pid):
                continue
            counts = {}
            for a in voters[i]:
                if a is not None:
                    counts[a] = counts.get(a, 0) + 1
            minority = {a: c for a, c in counts.items() if c >= max(1, G // 4) and a != m}
            beta = 0.3 * min(f / 0.3, 1.0)
            if not minority or beta == 0:
                continue
            total = sum(minority.values())
            bonus = {a: beta * c / total for a, c in minority.items()}
            size = sum(abs(x) for x in out[i]) / G + 1e-6
            for j, a in enumerate(answers[i]):
                if a is None:
                    out[i][j] += sum(bonus.values()) / len(bonus) * size * 0.05
                elif a in bonus:
                    out[i][j] += bonus[a] * size
        return out


# step -> per prompt the trained answers (voters = trained answers unless EXTRA names more)
SCENARIO = [
    {"flip": ["1", "1", "2", "3"], "steady": ["5"] * 4, "silent": [None] * 4, "tie": ["x", "y", "x", "y"]},
    {"flip": ["2", "2", None, "1"], "steady": ["5"] * 4, "silent": [None] * 4, "tie": ["y", "x", "y", "x"]},
    {"flip": ["2", "2", "2", "2"], "steady": ["5"] * 4, "silent": ["4", None, None, None], "tie": ["x", "y", "x", "y"]},
    {"flip": ["2", "2", "2", "2"], "steady": ["5"] * 4, "silent": ["4", "4", None, "7"], "tie": ["x", "x", "x", "y"]},
    {"flip": ["2", "2", "2", "2"], "steady": ["5"] * 4, "silent": ["4", "4", "4", "7"], "tie": ["x", "x", "x", "x"]},
    {"flip": ["2", "2", "2", "2"], "steady": ["5"] * 4, "silent": ["4", "4", "4", "4"], "tie": ["x", "x", "x", "x"]},
    {"flip": ["2", "2", "2", "2"], "steady": ["5"] * 4, "silent": ["4", "4", "4", "4"], "tie": ["x", "x", "x", "x"]},
    {"flip": ["2", "2", "3", "2"], "steady": ["5"] * 4, "silent": ["4", "4", "4", "4"], "tie": ["x", "x", "x", "x"]},
    {"flip": ["2", "2", "2", "2"], "steady": ["5"] * 4, "silent": ["4", "4", "4", "4"], "tie": ["x", "x", "x", "x"]},
]
EXTRA = {"tie": ["z", "z"]}  # two voting-only samples on one prompt


@pytest.mark.parametrize("parts", [dict(), dict(frs=False), dict(mps=False), dict(rcsu=False)])
def test_guard_step_equals_the_reference_over_a_multi_step_run(parts):
    reference, histories = ReferenceGuard(**parts), {}
    rng_ref, rng = random.Random(7), random.Random(7)
    settings = GuardSettings(**parts)
    gen = torch.Generator().manual_seed(0)
    pids = list(SCENARIO[0])
    fired = {"frs": 0, "rcsu": 0, "mps": 0}
    for step in SCENARIO:
        answers = [step[p] for p in pids]
        voters = [step[p] + EXTRA.get(p, []) for p in pids]
        adv = torch.randn(len(pids), 4, generator=gen, dtype=torch.float64)
        want = reference.step(pids, voters, answers, adv.tolist(), rng_ref)
        got = guard_step(histories, pids, voters, answers, adv, rng, settings)
        histories = got.histories
        flat = [x for row in want for x in row]
        assert got.advantages.flatten().tolist() == pytest.approx(flat, abs=1e-12, rel=1e-12)
        fired["frs"] += any(w != 1.0 for w in got.weights)
        fired["rcsu"] += not all(got.kept)
        fired["mps"] += any(got.bonus)
    # the scenario exercises every part that is on (a reference test that never fires checks nothing)
    assert all(fired[k] > 0 for k in fired if parts.get(k, True)), fired
    assert all(fired[k] == 0 for k in fired if not parts.get(k, True)), fired


def test_a_group_of_one_and_an_all_equal_group():
    histories, rng = {}, random.Random(0)
    for answers in (["3"], ["3"], ["4"]):
        got = guard_step(histories, ["p"], [answers], [answers], torch.tensor([[0.0]], dtype=torch.float64), rng)
        histories = got.histories
    assert got.flip_rates == [1.0] and got.weights == [pytest.approx(0.35)]  # (1 - 0.5) · (1 - 0.3): MR 1 > 0.6
    assert got.advantages.tolist() == [[0.0]]  # no minority answer in a group of one: no bonus
    same = guard_step({}, ["q"], [["2"] * 3], [["2"] * 3], torch.zeros(1, 3, dtype=torch.float64), rng)
    assert same.advantages.tolist() == [[0.0] * 3] and same.flip_rates == [0.0]


def test_the_first_visit_never_flips_and_histories_are_not_mutated():
    start = {"p": PromptHistory()}
    got = guard_step(start, ["p"], [["1", "2"]], [["1", "2"]], torch.ones(1, 2, dtype=torch.float64), random.Random(0))
    assert got.flip_rates == [0.0] and got.advantages.tolist() == [[1.0, 1.0]]
    assert start["p"] == PromptHistory() and got.histories["p"].majorities == ("1",)


@pytest.mark.parametrize("bad", [dict(tau_fr=1.5), dict(p_skip=-0.1), dict(window=0)])
def test_settings_out_of_range_are_refused(bad):
    with pytest.raises(ValueError, match="TTRL-Guard"):
        GuardSettings(**bad)


def test_a_prompt_twice_in_one_step_is_refused():
    with pytest.raises(ValueError, match="appears twice"):
        guard_step({}, ["p", "p"], [["1"], ["1"]], [["1"], ["1"]], torch.zeros(2, 1), random.Random(0))


def test_rcsu_needs_a_past_flip_and_spends_a_draw_per_high_risk_prompt_even_past_the_cap():
    settings = GuardSettings(p_skip=1.0, frs=False, mps=False)
    histories, rng = {}, random.Random(3)
    steps = [{"a": "1", "b": "5", "c": "7"}, {"a": "2", "b": "5", "c": "8"}] + [{"a": "2", "b": "5", "c": "8"}] * 3
    for step in steps:
        pids = list(step)
        votes = [[step[p]] * 4 for p in pids]
        got = guard_step(histories, pids, votes, votes, torch.ones(3, 4, dtype=torch.float64), rng, settings)
        histories = got.histories
    # after 5 visits: a and c flipped once, then held MR 1 -> high risk; b never flipped -> never at risk
    assert got.kept == [False, True, True]  # cap max(1, floor(3/4)) = 1: c is high risk but over the cap
    reference = random.Random(3)
    for _ in range(2):  # step 5 drew for a and for c, c's draw spent though the cap was reached
        reference.random()
    assert rng.random() == reference.random()


def test_mps_stays_on_for_exactly_mps_steady_calm_visits():
    from urlvr.algorithms.ttrl_guard import mps_update

    s = GuardSettings()
    h = mps_update(PromptHistory(), 1.0, s)
    states = []
    for _ in range(4):
        h = mps_update(h, 0.0, s)
        states.append(h.mps_active)
    assert states == [True, True, False, False]


# --------------------------------------------------------------------------- wired into the step
def test_the_step_applies_guard_step_to_the_estimators_advantages_of_the_global_batch():
    """`with_advantages` hands TTRL-Guard the prompt ids, each group's voters and trained answers and
    the estimator's float64 advantages, keeps the returned histories, and draws from the step's seed."""
    from types import SimpleNamespace

    from urlvr.algorithms.advantages import ADVANTAGE_ESTIMATORS
    from urlvr.recipe import load_recipe
    from urlvr.trainer.loop import with_advantages
    from urlvr.dist import DistInfo
    from urlvr.trainer.settings import RunSettings
    from urlvr.trainer.stages import Scored

    recipe = load_recipe({"model": {"path": "urlvr/tiny"}, "mode": "test_time",
                          "eval": {"source": {"kind": "arithmetic", "num_problems": 4}},
                          "rollout": {"group_size": 4}, "reward": {"vote_group_size": 6},
                          "algorithm": {"advantage_shaping": "ttrl_guard"}})
    settings = RunSettings.derive(recipe, DistInfo(0, 1, 0, torch.device("cpu")))
    parts = SimpleNamespace(settings=settings, advantage_state={})
    reference = {}
    visits = [(["1", "1", "2", "3", "1", "1"], [1.0, 1.0, 0.0, -1.0]), (["2", "2", "2", "1", None, "2"], [1.0, 0.0, 0.5, 1.0])]
    for step, (voters, rewards) in enumerate(visits, start=1):
        contexts = [SimpleNamespace(voters=tuple(voters), answers=tuple(voters[:4])),
                    SimpleNamespace(voters=("7",) * 6, answers=("7",) * 4)]
        total = torch.tensor([rewards, [1.0, 1.0, 1.0, 0.0]])
        scored = Scored(stats={}, contexts=contexts, rewards=SimpleNamespace(total=total))
        rollout = SimpleNamespace(records=[SimpleNamespace(prompt_id="x"), SimpleNamespace(prompt_id="y")])
        out = with_advantages(parts, scored, torch.device("cpu"), rollout, step)
        expected = guard_step(reference, ["x", "y"], [voters, ("7",) * 6], [voters[:4], ("7",) * 4],
                              ADVANTAGE_ESTIMATORS.get("grpo")(total.double(), eps=1e-6),
                              random.Random(settings.shaping_seed(step)))
        reference = expected.histories
        assert torch.equal(out.advantages, expected.advantages.float().flatten())
        assert out.advantage_metrics["ttrl_guard/flip_rate_mean"] == sum(expected.flip_rates) / 2
    assert out.advantage_metrics["ttrl_guard/flip_rate_mean"] == 0.5  # x flipped 1 -> 2, y held 7
    assert tuple(parts.advantage_state["x"]["majorities"]) == ("1", "2")


def test_a_run_that_revisits_no_prompt_is_refused(tmp_path):
    from conftest import small_run_recipe
    from urlvr.errors import RecipeError
    from urlvr.trainer.run import train

    recipe = small_run_recipe("urlvr/tiny", tmp_path / "run", algorithm={"advantage_shaping": "ttrl_guard"})
    with pytest.raises(RecipeError, match="visits none twice"):
        train(recipe)


def test_ttrl_guard_resumes_exactly_its_state_is_in_the_checkpoint(tmp_path):
    import json

    from urlvr.recipe import load_recipe
    from urlvr.trainer.run import train

    def recipe(out, steps):
        return load_recipe("recipes/zoo/ttrl-guard.yaml", [f"output_dir={out}", f"trainer.total_steps={steps}",
                                                           "trainer.save_every=2"])
    whole = train(recipe(tmp_path / "whole", 4))
    train(recipe(tmp_path / "split", 2))
    state = json.loads((tmp_path / "split" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert len(state["advantage_shaping"]) == 4  # one history per prompt
    resumed = train(recipe(tmp_path / "split", 4), resume=tmp_path / "split")
    volatile = ("time/", "perf/tokens_per_second")
    clean = lambda rows: [{k: v for k, v in r.items() if not k.startswith(volatile)} for r in rows]  # noqa: E731
    assert clean(resumed.metrics) == clean(whole.metrics[2:])
    assert any(m["ttrl_guard/flip_rate_mean"] > 0 for m in whole.metrics)  # the guard acted
