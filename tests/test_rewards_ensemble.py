"""Majority vote (ties, missing answers, extra voters, filter) and the semantic-cluster reward."""

import pytest
import torch

from urlvr.rewards.base import RewardContext, check_reward_kwargs
from urlvr.rewards.ensemble import semantic_cluster
from urlvr.rewards.extractors import extract_boxed
from urlvr.rewards.voting import majority_answers, majority_vote
from urlvr.rollout.base import Group, PromptInput, Sample


def group_of(answers, vote_answers=None):
    samples = tuple(Sample((1,), (0.0,), "", "eos") for _ in answers)
    group = Group(PromptInput("p", "q", (5,)), samples)
    ctx = RewardContext(answers=tuple(answers), response_mask=torch.ones(len(answers), 1), token_stats={},
                        extract_answer=extract_boxed, vote_answers=None if vote_answers is None else tuple(vote_answers))
    return group, ctx


def reference_majority(answers):
    """Hand-rolled: the answer with the highest count; first seen wins a tie; None if no answer."""
    best, best_count = None, 0
    for a in answers:
        if a is not None and answers.count(a) > best_count:
            best, best_count = a, answers.count(a)
    return best


@pytest.mark.parametrize("answers", [
    ["3", "4", "3", None], ["4", "3", "3", "4"], ["a", "b", "c", "d"], [None, None], ["7"], [None, "2", None, None],
])
def test_majority_vote_matches_hand_reference(answers):
    group, ctx = group_of(answers)
    majority = reference_majority(answers)
    expected = [float(a is not None and a == majority) for a in answers]
    out = majority_vote(group, ctx)
    assert out.scores == expected
    assert out.diagnostics["majority_ratio"][0] == (answers.count(majority) / len(answers) if majority else 0.0)


def test_tie_rules():
    answers = ["4", "3", "3", "4", "5"]
    assert majority_answers(answers, ties="first") == {"4"}
    assert majority_answers(answers, ties="all") == {"3", "4"}
    assert majority_answers(answers, ties="none") == set()
    group, ctx = group_of(answers)
    assert majority_vote(group, ctx, ties="all").scores == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert majority_vote(group, ctx, ties="none").scores == [0.0] * 5


def test_no_answer_abstains_or_votes():
    answers = [None, None, None, "2", "2"]
    group, ctx = group_of(answers)
    assert majority_vote(group, ctx).scores == [0, 0, 0, 1, 1]  # abstain: "2" wins among answers
    assert majority_vote(group, ctx, no_answer="vote").scores == [0.0] * 5  # "no answer" wins: nobody scores


def test_min_majority_ratio_filters_weak_majorities():
    group, ctx = group_of(["1", "1", "2", "3", "4"])  # majority share 2/5
    assert majority_vote(group, ctx, min_majority_ratio=0.4).scores == [1, 1, 0, 0, 0]
    assert majority_vote(group, ctx, min_majority_ratio=0.5).scores == [0.0] * 5


def test_extra_voters_decide_the_majority_but_only_trained_samples_are_scored():
    trained = ["1", "2", "2", "1"]  # alone: "1" wins the tie (seen first)
    voters = trained + ["2", "2", "1", None]  # the 8 voters: "2" has 4, "1" has 3
    group, ctx = group_of(trained, voters)
    out = majority_vote(group, ctx)
    assert out.scores == [0.0, 1.0, 1.0, 0.0]
    assert out.diagnostics["majority_ratio"][0] == 4 / 8


def test_majority_vote_kwargs_are_validated_at_load_time():
    with pytest.raises(ValueError, match="ties"):
        check_reward_kwargs("majority_vote", {"ties": "random"})
    with pytest.raises(ValueError, match="no argument 'tie'"):
        check_reward_kwargs("majority_vote", {"tie": "first"})


# --------------------------------------------------------------------------- semantic cluster
@pytest.mark.parametrize("answers", [["1", "2", "1", None, "3", "1"], ["a", "b", "c"], [None, None], ["x"] * 4])
def test_semantic_cluster_exact_is_cluster_share(answers):
    group, ctx = group_of(answers)
    out = semantic_cluster(group, ctx, equivalence="exact")
    assert out.scores == [0.0 if a is None else answers.count(a) / len(answers) for a in answers]


def test_semantic_cluster_threshold_and_singletons():
    answers = ["1", "2", "3", "4", "5", None]  # largest cluster 1/6 < 0.25
    group, ctx = group_of(answers)
    assert semantic_cluster(group, ctx, equivalence="exact", min_cluster_ratio=0.25).scores == [0.0] * 6
    assert semantic_cluster(group, ctx, equivalence="exact", min_cluster_ratio=0.1).scores == [1 / 6] * 5 + [0.0]
    singles = semantic_cluster(group, ctx, equivalence="exact", no_answer="singleton").scores
    assert singles == [1 / 6] * 6  # EMPO's code: an empty answer is its own cluster


def test_semantic_cluster_over_extra_voters():
    group, ctx = group_of(["1", "2"], ["1", "2", "2", "2"])
    assert semantic_cluster(group, ctx, equivalence="exact").scores == [0.25, 0.75]


def test_semantic_cluster_math_verify_merges_equivalent_forms():
    pytest.importorskip("math_verify")
    answers = ["\\frac{1}{2}", "0.5", "1/2", "2", None, "2.0"]
    group, ctx = group_of(answers)
    out = semantic_cluster(group, ctx, timeout_s=60.0)  # default: math-verify equivalence; limits that never race
    assert out.scores == [0.5, 0.5, 0.5, 2 / 6, 0.0, 2 / 6]
    assert out.diagnostics["clusters"][0] == 2.0
    assert out.diagnostics["equivalence_failures"][0] == 0.0
