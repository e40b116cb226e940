"""The unified reward (Eq. 26) reproduces each special case of Table 6, and Eq. 26 itself holds
against a float64 cross-entropy reference."""

import math

import pytest
import torch

from test_rewards_certainty import G, T, V, make_ctx, make_group, random_case, softmax64
from urlvr.rewards.base import RewardContext, check_reward_kwargs
from urlvr.rewards.certainty import probability, self_certainty, token_entropy, trajectory_entropy
from urlvr.rewards.ensemble import semantic_cluster
from urlvr.rewards.extractors import extract_boxed
from urlvr.rewards.unified import answer_distribution, unified
from urlvr.rewards.voting import majority_vote
from urlvr.rollout.base import Group, PromptInput, Sample

TOKEN_CASES = [
    (self_certainty, dict(anchor="uniform", sign=1, transform="identity")),
    (token_entropy, dict(anchor="self", sign=-1, transform="identity")),
    (trajectory_entropy, dict(anchor="onehot", sign=-1, transform="identity")),
    (probability, dict(anchor="onehot", sign=-1, transform="exp", aggregate="sum")),
]


@pytest.mark.parametrize("named, kwargs", TOKEN_CASES, ids=lambda c: getattr(c, "__name__", ""))
@pytest.mark.parametrize("seed", [0, 1])
def test_token_level_special_cases_coincide(named, kwargs, seed):
    _, _, mask, stats = random_case(seed)
    group, ctx = make_group(), make_ctx(stats, mask)
    assert unified(group, ctx, granularity="token", **kwargs) == named(group, ctx)  # exactly, not approximately


def cross_entropy64(q, p):
    return -sum(qv * math.log(pv) for qv, pv in zip(q, p) if qv > 0)


@pytest.mark.parametrize("anchor", ["uniform", "onehot", "self"])
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("transform", ["identity", "exp"])
def test_eq26_against_float64_cross_entropy(anchor, sign, transform):
    logits, targets, mask, stats = random_case(3, 1.0)
    got = unified(make_group(), make_ctx(stats, mask), anchor=anchor, sign=sign, transform=transform)
    for j in range(G):
        hs = []
        for t in range(T):
            if mask[j, t] == 0:
                continue
            p = softmax64(logits[j, t])
            q = {"uniform": [1 / V] * V, "self": p,
                 "onehot": [1.0 if v == int(targets[j, t]) else 0.0 for v in range(V)]}[anchor]
            h = cross_entropy64(q, p)
            hs.append(h - math.log(V) if anchor == "uniform" else h)  # uniform: the KL (module note)
        if not hs:
            assert got[j] == 0.0
            continue
        z = sign * sum(hs) / len(hs)
        assert got[j] == pytest.approx(z if transform == "identity" else math.exp(z), rel=1e-5, abs=1e-6)


def answer_group(answers):
    samples = tuple(Sample((1,), (0.0,), "", "eos") for _ in answers)
    group = Group(PromptInput("p", "q", (5,)), samples)
    ctx = RewardContext(answers=tuple(answers), response_mask=torch.ones(len(answers), 1), token_stats={},
                        extract_answer=extract_boxed)
    return group, ctx


ANSWER_SETS = [
    ["1", "2", "1", None, "3", "1"],
    ["5", "5", "5", "5"],
    ["a", "b", "c", "d"],  # all distinct
    [None, None, None],  # no answers at all
    ["x", "y", "y", "x", "x", None, "z", "y", "x"],
]


@pytest.mark.parametrize("answers", ANSWER_SETS)
def test_answer_level_is_semantic_cluster(answers):
    group, ctx = answer_group(answers)
    expected = semantic_cluster(group, ctx, equivalence="exact").scores
    got = unified(group, ctx, granularity="answer", anchor="onehot", sign=-1, transform="exp").scores
    assert got == pytest.approx(expected, abs=1e-15)
    for j, a in enumerate(answers):  # exp(-H(delta_A, pi^A)) = pi^A(ans(y)) = |C| / G
        assert got[j] == (0.0 if a is None else answers.count(a) / len(answers))


@pytest.mark.parametrize("answers", [a for a in ANSWER_SETS if a != ["a", "b", "c", "d"]])
def test_answer_level_tau_limit_is_majority_vote(answers):
    group, ctx = answer_group(answers)
    expected = majority_vote(group, ctx).scores
    assert unified(group, ctx, granularity="answer", anchor="onehot", sign=-1, transform="exp", tau=0.0).scores == expected
    tempered = unified(group, ctx, granularity="answer", anchor="onehot", sign=-1, transform="exp", tau=0.005).scores
    assert tempered == pytest.approx(expected, abs=1e-6)  # tau -> 0+ converges to the indicator


def test_answer_level_tie_limit_splits_the_mass():
    group, ctx = answer_group(["a", "b", "a", "b"])
    assert unified(group, ctx, granularity="answer", anchor="onehot", sign=-1, transform="exp", tau=0.0).scores == [0.5] * 4
    assert majority_vote(group, ctx).scores == [1.0, 0.0, 1.0, 0.0]  # the indicator breaks the tie (first seen)


def test_tempered_distribution_is_a_softmax_of_shares():
    p = answer_distribution({0: 3, 1: 1}, 4, tau=0.5)
    e0, e1 = math.exp(0.75 / 0.5), math.exp(0.25 / 0.5)
    assert p == pytest.approx({0: e0 / (e0 + e1), 1: e1 / (e0 + e1)})


@pytest.mark.parametrize("kwargs, message", [
    (dict(anchor="unifrom"), "anchor"),
    (dict(sign=2), "sign"),
    (dict(granularity="answer", transform="identity"), "answer"),
    (dict(granularity="answer", anchor="self", transform="exp"), "answer"),
    (dict(aggregate="median"), "aggregate"),
])
def test_bad_combinations_fail_at_load_time(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_reward_kwargs("unified", kwargs)
