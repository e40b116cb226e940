"""The vote-based zoo (issue 23): `urlvr rewards NAME` makes every reward's knobs discoverable,
and the zoo recipes that are exact compositions of existing parts (SRT, CuMa's masking) say so,
carry their paper's settings and run two CPU steps on the embedded tiny model."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from urlvr.cli import main
import urlvr.builtins  # noqa: F401
from urlvr.recipe import load_recipe
from urlvr.rewards.base import REWARDS, describe_reward, reward_knobs


# --------------------------------------------------------------------------- urlvr rewards NAME
def test_rewards_name_prints_the_whole_docstring_and_every_knob(capsys):
    assert main(["rewards", "majority_vote"]) == 0
    out = capsys.readouterr().out
    doc = inspect.cleandoc(REWARDS.get("majority_vote").fn.__doc__)
    assert doc in out  # the whole docstring, not its first line
    assert "min_majority_ratio  float  = 0.0" in out and "ties" in out and "'first'" in out


def test_every_registered_reward_lists_each_signature_knob_with_its_default():
    for name in REWARDS.names():
        spec = REWARDS.get(name)
        params = [p for p in list(inspect.signature(spec.fn).parameters.values())[2:]
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        knobs = reward_knobs(spec)
        assert [k[0] for k in knobs] == [p.name for p in params], name
        for (_, _, default), p in zip(knobs, params):
            assert default == ("required" if p.default is p.empty else repr(p.default)), name
        text = describe_reward(spec)
        assert text.startswith(name) and all(k[0] in text for k in knobs)


def test_rewards_name_refuses_an_unknown_name_in_one_line(capsys):
    assert main(["rewards", "majorty_vote"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'majority_vote'" in err


def test_rewards_list_is_unchanged(capsys):
    assert main(["rewards"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = [f"{n:24s} {'[oracle] ' if REWARDS.get(n).needs_label else ''}{REWARDS.get(n).description}"
                for n in REWARDS.names()]
    assert lines == expected


# --------------------------------------------------------------------------- reference loops
# Written from the papers' definitions in plain Python float64, not from urlvr's code: each takes
# the voters' answers (None = no answer) and returns (rewards, advantages) for the trained samples.
def srt_reference(answers, voters=None):
    """SRT (arXiv 2505.21444, Algorithm 1): r = 1[answer(y) = majority], RLOO advantage
    A_i = r_i - (1/(n-1)) sum_{j != i} r_j. Ties: the first-seen answer (urlvr's stated choice)."""
    voters = answers if voters is None else voters
    counts = {}
    for a in voters:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    majority, best = None, 0
    for a in voters:  # first seen wins a tie: only a strictly larger count replaces it
        if a is not None and counts[a] > best:
            majority, best = a, counts[a]
    rewards = [1.0 if (a is not None and a == majority) else 0.0 for a in answers]
    n = len(rewards)
    if n < 2:
        return rewards, [0.0] * n
    advantages = [rewards[i] - sum(rewards[j] for j in range(n) if j != i) / (n - 1) for i in range(n)]
    return rewards, advantages


def cuma_reference(answers, voters=None, share=0.5):
    """CuMa (arXiv 2511.04902): majority vote, the group masked (all 0) unless the top answer's
    count exceeds share * |voters| (answerless voters count in |voters|)."""
    voters = answers if voters is None else voters
    counts = {}
    for a in voters:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts or not max(counts.values()) > share * len(voters):
        return [0.0] * len(answers)
    top = max(counts, key=counts.get)  # unique: more than half cannot tie
    return [1.0 if a == top else 0.0 for a in answers]


CASES = {
    "clear_majority": ["7", "7", "7", "3"],
    "tie_two_two": ["1", "2", "1", "2"],
    "exactly_half": ["5", "5", "6", "8"],  # share 1/2: not a strict majority
    "no_answers": [None, None, None, None],
    "mostly_no_answer": [None, None, None, "4"],
    "single_sample": ["9"],
    "single_no_answer": [None],
    "all_equal": ["2", "2", "2", "2", "2"],
    "odd_group": ["1", None, "1", "2", "1"],
    "three_way": ["a", "b", "c", "a", "b", "a"],
}


def run_reward(name, answers, voters=None, **kwargs):
    """The registered reward on one group, through `call_reward`, with responses of different
    lengths (padded masks): scores and diagnostics."""
    import torch

    from urlvr.rewards.base import RewardContext, call_reward
    from urlvr.rollout.base import Group, PromptInput, Sample

    lengths = [2 + 3 * i for i in range(len(answers))]
    samples = tuple(Sample(token_ids=(1,) * n, logprobs=(0.0,) * n, text=f"answer {a}", finish_reason="eos")
                    for n, a in zip(lengths, answers))
    mask = torch.zeros(len(answers), max(lengths))
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    ctx = RewardContext.for_group(answers, mask, extract_answer=lambda text: None, vote_answers=voters)
    out = call_reward(REWARDS.get(name), Group(PromptInput("p0", "q", (5,)), samples), ctx, kwargs)
    return list(out.scores), out.diagnostics


def rloo(scores):
    import torch

    from urlvr.algorithms.advantages import ADVANTAGE_ESTIMATORS

    return ADVANTAGE_ESTIMATORS.get("rloo")(torch.tensor([scores], dtype=torch.float64))[0].tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_srt_recipe_parts_equal_the_papers_reward_and_rloo(case):
    answers = CASES[case]
    want_r, want_a = srt_reference(answers)
    scores, _ = run_reward("majority_vote", answers)  # the reward the SRT recipe names, its defaults
    assert scores == want_r
    assert rloo(scores) == pytest.approx(want_a, abs=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_cuma_equals_its_reference(case):
    answers = CASES[case]
    scores, diag = run_reward("cuma", answers)
    assert scores == cuma_reference(answers)
    # voters = trained samples: an unmasked group always rewards its top answer's samples
    assert diag["masked"] == [float(not any(cuma_reference(answers)))] * len(answers)


def test_cuma_masks_exactly_the_groups_without_a_strict_majority():
    """Where it must differ from plain majority voting: a tie, exactly half, mostly no answer."""
    for case in ("tie_two_two", "exactly_half", "mostly_no_answer"):
        assert run_reward("majority_vote", CASES[case])[0] != [0.0] * len(CASES[case]), case
        scores, diag = run_reward("cuma", CASES[case])
        assert scores == [0.0] * len(CASES[case]) and set(diag["masked"]) == {1.0}, case
    scores, diag = run_reward("cuma", CASES["clear_majority"])
    assert scores == [1.0, 1.0, 1.0, 0.0] and set(diag["masked"]) == {0.0}
    assert diag["majority_ratio"] == [0.75] * 4
    # a masked group trains nothing: every advantage estimator gives it exactly 0
    assert rloo(run_reward("cuma", CASES["tie_two_two"])[0]) == [0.0] * 4


def test_cuma_votes_with_the_extra_voters_and_its_knob_acts():
    trained, voters = ["1", "2"], ["1", "2", "2", "2", "1", "3"]  # 3 of 6 vote "2": exactly half
    assert run_reward("cuma", trained, voters)[0] == cuma_reference(trained, voters) == [0.0, 0.0]
    voters = ["1", "2", "2", "2", "2", "3"]  # 4 of 6
    assert run_reward("cuma", trained, voters)[0] == cuma_reference(trained, voters) == [0.0, 1.0]
    # majority_share: 4/6 passes 0.5 and fails 0.7
    assert run_reward("cuma", trained, voters, majority_share=0.7)[0] == cuma_reference(trained, voters, 0.7) == [0.0, 0.0]


@pytest.mark.parametrize("share", [0.49, 1.0, -1.0])
def test_cuma_refuses_a_share_that_is_not_a_majority_at_load(share):
    from urlvr.rewards.base import check_reward_kwargs

    with pytest.raises(ValueError, match="majority_share must lie in"):
        check_reward_kwargs("cuma", {"majority_share": share})


def test_hostile_text_never_raises_in_the_vote_rewards():
    from test_hostile_text import HOSTILE
    from urlvr.rewards.extractors import make_extractor

    extract = make_extractor("boxed")
    answers = [extract(text) for text in HOSTILE.values()] + ["\\boxed{1}", None]
    for name in ("cuma", "majority_vote"):
        scores, _ = run_reward(name, answers)
        assert len(scores) == len(answers)


# --------------------------------------------------------------------------- recipes/zoo
ZOO = Path(__file__).resolve().parents[1] / "recipes" / "zoo"


def test_srt_recipe_is_majority_vote_with_rloo():
    r = load_recipe(ZOO / "srt.yaml")
    assert [(t.name, t.kwargs, t.weight, t.gate) for t in r.reward.terms] == [("majority_vote", {}, 1.0, None)]
    assert r.algorithm.advantage == "rloo" and r.model.path == "urlvr/tiny" and r.trainer.total_steps == 2


def test_cuma_recipe_masks_and_keeps_file_order():
    r = load_recipe(ZOO / "cuma.yaml")
    assert [(t.name, t.kwargs) for t in r.reward.terms] == [("cuma", {"majority_share": 0.5})]
    assert r.data.shuffle is False and r.model.path == "urlvr/tiny-aligned" and r.trainer.total_steps == 2


@pytest.mark.parametrize("name, term", [("srt", "majority_vote"), ("cuma", "cuma")])
def test_zoo_recipe_runs_two_cpu_steps(name, term, tmp_path):
    import urlvr

    result = urlvr.train(load_recipe(ZOO / f"{name}.yaml", [f"output_dir={tmp_path / 'run'}"]))
    assert [m["step"] for m in result.metrics] == [1, 2]
    for m in result.metrics:
        assert f"reward/{term}_mean" in m and m["actor/ratio_mean"] == m["actor/ratio_mean"]
        if name == "cuma":
            assert 0.0 <= m["reward/cuma/masked_mean"] <= 1.0
        assert m["dynamics/answer_rate"] > 0, m  # at max_new_tokens 24 no response was ever boxed
    # the documented run trains: some step has a group with reward variance and a gradient
    # (the shipped recipes used to run two vacuous steps, every group zero-variance, grad_norm 0)
    assert any(m["reward/zero_variance_group_fraction"] < 1.0 and m["actor/grad_norm"] > 0 for m in result.metrics)
    if name == "cuma":  # and the mask really acted on some group (the recipe's point)
        assert any(m["reward/cuma/masked_mean"] > 0 for m in result.metrics)
