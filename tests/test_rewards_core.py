"""Minimal built-in rewards (majority vote, ground truth, format), extractors and composition."""

import math

import pytest
import torch

from urlvr.rewards.base import LabelAccessError, RewardContext
from urlvr.rewards.compose import RewardTermSpec, score_batch
from urlvr.rewards.extractors import extract_boxed, normalize_answer
from urlvr.rewards.external import ground_truth
from urlvr.rewards.voting import majority_answer, majority_vote
from urlvr.rollout.base import Group, PromptInput, Sample


def make_group(texts, prompt_id="p0"):
    samples = tuple(Sample(token_ids=(1,), logprobs=(0.0,), text=t, finish_reason="eos") for t in texts)
    return Group(prompt=PromptInput(prompt_id, "q", (5,)), samples=samples)


def make_ctx(group, label=None):
    answers = tuple(extract_boxed(s.text) for s in group.samples)
    return RewardContext(answers=answers, response_mask=torch.ones(group.size, 1), token_stats={},
                         extract_answer=extract_boxed, _label=label)


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{71}.", "71"), ("\\boxed{ 71.0 }", "71"), ("\\boxed{1}\\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("\\boxed{-05}", "-5"), ("no box", None), ("\\boxed{}", None),
    ("\\boxed{12", None), ("$\\boxed{\\text{yes}}$", "yes"),
])
def test_boxed_extractor(text, expected):
    assert extract_boxed(text) == expected


def test_normalize_answer():
    assert normalize_answer(" $42$ ") == "42" and normalize_answer("3.50") == "3.50"


# issue 10, item 7: digit-group separators. Groups of exactly three digits after the first are
# thousands (any of the spellings, one separator throughout); anything else is a tuple and stays one.
@pytest.mark.parametrize("text, expected", [
    ("8,000", "8000"), ("8{,}000", "8000"), ("8\\,000", "8000"), ("8\\ 000", "8000"), ("10 000", "10000"),
    ("1\u2009234\u2009567", "1234567"), ("1\u202f000", "1000"), ("8~000", "8000"), ("-1,234,567.25", "-1234567.25"),
    ("+08,000.0", "8000"), ("\\text{8,000}", "8000"),
    ("1,2", "1,2"), ("12,34", "12,34"), ("1,234,5", "1,234,5"), ("1234,567", "1234,567"), ("1,000 000", "1,000 000"),
    ("(1,234)", "(1,234)"), ("1 2", "1 2"), ("x + 1", "x+1"),
])
def test_normalize_answer_digit_groups(text, expected):
    assert normalize_answer(text) == expected


# issue 10, item 8: the spellings of a boxed answer that render the same box (MATH's reference
# extractor also reads `\fbox{}` and the space form `\boxed 42`).
@pytest.mark.parametrize("text, expected", [
    ("\\fbox{42}", "42"), ("\\boxed {42}", "42"), ("\\boxed\n{42}", "42"), ("$\\boxed 42$", "42"),
    ("so \\boxed 42. done", "42"), ("\\boxed{\\text{(B)}}", "(B)"), ("\\boxed{\\textbf{yes}}", "yes"),
    ("\\boxed{\\mathrm{odd}}", "odd"), ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"), ("\\boxed{a\\}b}", "a\\}b"), ("\\boxed{1} then \\fbox{2}", "2"),
    ("\\boxed{\\boxed{3}}", "3"), ("\\boxed{8,000}", "8000"),
    ("\\boxed42", None), ("\\boxedx{1}", None), ("\\fbox{", None), ("\\boxed ", None),
])
def test_boxed_spellings(text, expected):
    assert extract_boxed(text) == expected


def test_majority_vote_counts_digit_groups_as_one_answer():
    texts = [f"\\boxed{{{a}}}" for a in ["7", "8,000", "7", "8000", "8,000"]]  # was won by 7
    group = make_group(texts)
    assert majority_answer(make_ctx(group).answers) == "8000"
    assert list(majority_vote(group, make_ctx(group)).scores) == [0.0, 1.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("label", ["8000", "8,000", "8{,}000"])
def test_ground_truth_reads_digit_groups(label):
    group = make_group(["\\boxed{8,000}", "\\boxed{8\\,000}", "\\boxed{8000}", "\\boxed{80,00}"])
    assert ground_truth(group, make_ctx(group, label=label).with_label_access(True)) == [1.0, 1.0, 1.0, 0.0]


def test_last_number_reads_digit_groups():
    from urlvr.rewards.extractors import extract_last_number

    assert extract_last_number("It costs 8,000 dollars.") == "8000"
    assert extract_last_number("so 1\\,234\\,567 in all") == "1234567"
    assert extract_last_number("the pair 1,2") == "2" and extract_last_number("1,2345") == "2345"
    assert extract_last_number("in 3 000 ways") == "0"  # plain spaces do not group in prose


def test_majority_vote_rewards_the_majority():
    group = make_group(["\\boxed{3}", "\\boxed{4}", "\\boxed{3}", "none"])
    out = majority_vote(group, make_ctx(group))
    assert list(out.scores) == [1.0, 0.0, 1.0, 0.0]
    assert out.diagnostics["majority_ratio"][0] == 0.5


def test_majority_vote_tie_goes_to_first_seen_and_no_answer_scores_zero():
    assert majority_answer(["4", "3", "3", "4"]) == "4"
    assert majority_answer([None, None]) is None
    group = make_group(["a", "b"])  # no boxed answers at all
    assert list(majority_vote(group, make_ctx(group)).scores) == [0.0, 0.0]


def test_ground_truth_needs_the_label_and_normalises():
    group = make_group(["\\boxed{7.0}", "\\boxed{8}", "x"])
    ctx = make_ctx(group, label="7").with_label_access(True)
    assert ground_truth(group, ctx) == [1.0, 0.0, 0.0]


def test_label_is_hidden_from_non_oracle_rewards():
    group = make_group(["\\boxed{7}"])
    with pytest.raises(LabelAccessError):
        make_ctx(group, label="7").label


def test_score_batch_weights_terms_and_keeps_oracle_apart():
    groups = [make_group(["\\boxed{1}", "\\boxed{1}", "\\boxed{2}"], "a"), make_group(["\\boxed{5}", "x", "\\boxed{5}"], "b")]
    contexts = [make_ctx(groups[0], label="2"), make_ctx(groups[1], label=None)]
    terms = [RewardTermSpec("majority_vote", 2.0, {}), RewardTermSpec("format", -0.5, {})]
    out = score_batch(groups, contexts, terms, oracle="ground_truth")
    assert out.total.tolist() == [[1.5, 1.5, -0.5], [1.5, 0.0, 1.5]]
    assert out.oracle[0].tolist() == [0.0, 0.0, 1.0]
    assert all(math.isnan(v) for v in out.oracle[1].tolist())  # no label: absent, not zero
    assert out.diagnostics["majority_vote/majority_ratio"].shape == (2, 3)


def test_reward_returning_wrong_count_is_refused():
    from urlvr.rewards.base import RewardSpec, call_reward

    spec = RewardSpec("bad", lambda group, ctx: [1.0], False, "")
    group = make_group(["a", "b"])
    with pytest.raises(ValueError, match="returned 1 scores for a group of 2"):
        call_reward(spec, group, make_ctx(group), {})


BUILTIN_FAMILIES = {  # what each built-in's score claims (docs/dynamics.md): a new built-in must be classified here
    "majority_vote": "verdict", "cuma": "verdict", "scope": "verdict", "co_reward": "verdict", "self_verification": "verdict", "countdown": "verdict",
    "ground_truth": "verdict", "math_verify": "verdict",
    "self_certainty": "certainty", "token_entropy": "certainty", "trajectory_entropy": "certainty",
    "probability": "certainty", "probability_disparity": "certainty", "unified": "certainty",
    "semantic_cluster": "certainty", "evol_rl": "certainty",
    "format": "other", "overlong_penalty": "other", "reasoning_gym": "other",  # partial credit: not a 0/1 verdict
}


def test_every_builtin_reward_declares_its_family():
    import urlvr.builtins  # noqa: F401
    from urlvr.rewards.base import REWARDS

    builtins = {name: REWARDS.get(name).family for name in REWARDS.names()
                if REWARDS.get(name).fn.__module__.startswith("urlvr.")}
    assert builtins == BUILTIN_FAMILIES


def test_reward_family_must_be_known():
    from urlvr.rewards.base import reward

    with pytest.raises(ValueError, match="family must be one of verdict, certainty, other"):
        reward("test_bad_family", family="ensemble")


def test_countdown_stays_a_verdict():
    from urlvr.rewards.base import check_reward_kwargs

    check_reward_kwargs("countdown", {"format_score": 0.1})
    with pytest.raises(ValueError, match="format_score must lie in"):
        check_reward_kwargs("countdown", {"format_score": 0.5})


@pytest.mark.parametrize("allowed", [True, False])
def test_a_truncated_response_carries_an_answer_only_when_the_recipe_allows(allowed):
    """`reward.answer_from_truncated`: a response cut at the token cap ("To add 54 and 83, we'll",
    SmolLM2's collapse) has no answer when false, so it cannot vote `83`; a stopped one keeps its answer."""
    from urlvr.dist import DistInfo
    from urlvr.data.records import PromptRecord
    from urlvr.recipe import load_recipe
    from urlvr.trainer.settings import RunSettings

    recipe = load_recipe({"reward": {"extractor": "last_number", "answer_from_truncated": allowed}})
    settings = RunSettings.derive(recipe, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    samples = (Sample((1, 2), (0.0, 0.0), "To add 54 and 83, we'll", "length"),
               Sample((1, 2, 3), (0.0, 0.0, 0.0), "54 + 83 = 137", "stop"),
               Sample((1, 2), (0.0, 0.0), "The sum is 137", "length"))
    group = Group(PromptInput("p0", "What is 54 + 83?", (5,)), samples)
    ctx = settings.reward_context(group, group, PromptRecord("p0", "What is 54 + 83?", "137"), torch.ones(3, 3), {}, None)
    assert list(ctx.answers) == (["83", "137", "137"] if allowed else [None, "137", None])
