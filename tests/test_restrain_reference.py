"""RESTRAIN's advantages against an independent plain-Python float64 reference.

The reference below is written from the paper's formulas (Yu et al. 2025, arXiv 2510.02172, §3), not
from `urlvr/algorithms/restrain.py`: for one prompt with n voting samples (the G trained samples first)

    candidates a_j: distinct non-None voter answers, c_j their counts, f_j = c_j / n, M = max_j c_j
    g(f) = exp(-(f - center)^2 / (2 sigma^2)),   u = g(reference_share) or 1
    M < kappa * n (n > 0)  ->  A_i = -delta * u
    otherwise              ->  A_i = u * sum_j w_j A_ij,  w_j = g(f_j) / sum_l g(f_l),
                               A_ij = GRPO advantage of r_ij = [answers[i] == a_j] (unbiased std, eps 1e-6)

Every value urlvr returns is compared to it with `math.isclose(rel_tol=1e-12, abs_tol=1e-12)`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import pytest
import torch

from urlvr.algorithms.advantage_shaping import RestrainShaping
from urlvr.algorithms.advantages import grpo_advantages
from urlvr.algorithms.restrain import RestrainSettings, label_weights, reference_share, restrain_group

EPS = 1e-6
TOL = dict(rel_tol=1e-12, abs_tol=1e-12)



# --------------------------------------------------------------------------- reference
@dataclass(frozen=True)
class Expected:
    advantages: list[float]
    penalized: bool
    prompt_weight: float
    candidates: int
    weights: list[float]  # w_j in the candidates' order of first appearance among the voters


def ref_g(f: float, sigma: float, center: float) -> float:
    """g(f) = exp(-(f - center)^2 / (2 sigma^2)); underflows to 0.0 for a tiny sigma, which is its value."""
    return math.exp(-((f - center) ** 2) / (2.0 * sigma * sigma))


def ref_weights(shares: Sequence[float], sigma: float, center: float) -> list[float]:
    """w_j = g(f_j) / sum_l g(f_l), evaluated as exp(e_j - max e) / sum_l exp(e_l - max e): the same ratio,
    which stays defined when every g(f_l) underflows to 0 (a tiny sigma)."""
    if not shares:
        return []
    exponents = [-((f - center) ** 2) / (2.0 * sigma * sigma) for f in shares]
    top = max(exponents)
    scaled = [math.exp(e - top) for e in exponents]
    total = math.fsum(scaled)
    return [s / total for s in scaled]


def ref_grpo(rewards: Sequence[float]) -> list[float]:
    """(r - mean) / (unbiased std + eps); 0 for every sample when G < 2 or every reward is equal."""
    size = len(rewards)
    if size < 2 or all(r == rewards[0] for r in rewards):
        return [0.0] * size
    mean = math.fsum(rewards) / size
    std = math.sqrt(math.fsum((r - mean) ** 2 for r in rewards) / (size - 1))
    return [(r - mean) / (std + EPS) for r in rewards]


def ref_reference_share(answers: Sequence[str | None]) -> float:
    """Max count of a non-None answer / len(answers); 0.0 for an empty list or all None."""
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts:
        return 0.0
    return max(counts.values()) / len(answers)


def ref_restrain(voters: Sequence[str | None], answers: Sequence[str | None], *, sigma: float,
                 center: float, kappa: float, delta: float, share: float | None) -> Expected:
    n = len(voters)
    counts: dict[str, int] = {}  # insertion order = first appearance
    for v in voters:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    majority = max(counts.values()) if counts else 0
    u = 1.0 if share is None else ref_g(share, sigma, center)
    labels = list(counts)
    weights = ref_weights([counts[a] / n for a in labels], sigma, center)
    if n > 0 and Fraction(majority, n) < Fraction(repr(kappa)):  # exact: kappa is the decimal the user wrote
        return Expected([-delta * u] * len(answers), True, u, len(labels), weights)
    total = [0.0] * len(answers)
    for label, w in zip(labels, weights):
        adv = ref_grpo([1.0 if a == label else 0.0 for a in answers])
        total = [t + w * x for t, x in zip(total, adv)]
    return Expected([u * t for t in total], False, u, len(labels), weights)


# --------------------------------------------------------------------------- helpers
def estimate(rewards: torch.Tensor) -> torch.Tensor:
    return grpo_advantages(rewards, eps=EPS)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, **TOL)


def check(voters: Sequence[str | None], answers: Sequence[str | None], *, sigma: float = 0.3,
          center: float = 1.0, kappa: float = 0.3, delta: float = 0.5,
          share: float | None = None) -> Expected:
    """urlvr's restrain_group equals the reference in every field; returns the reference."""
    settings = RestrainSettings(sigma=sigma, center=center, kappa=kappa, delta=delta)
    got = restrain_group(list(voters), list(answers), estimate, settings, reference_share=share)
    want = ref_restrain(voters, answers, sigma=sigma, center=center, kappa=kappa, delta=delta, share=share)
    case = f"voters={[v if v is None or len(v) < 40 else v[:10] + '…' for v in voters]!r} G={len(answers)} " \
           f"sigma={sigma} center={center} kappa={kappa} delta={delta} share={share}"
    assert len(got.advantages) == len(answers), case
    for i, (g, w) in enumerate(zip(got.advantages, want.advantages)):
        assert isinstance(g, float), case
        assert not math.isnan(g), case
        assert close(g, w), f"{case}: advantage {i}: urlvr {g!r} reference {w!r}"
    assert got.penalized == want.penalized, f"{case}: penalized urlvr {got.penalized} reference {want.penalized}"
    assert close(got.prompt_weight, want.prompt_weight), f"{case}: u urlvr {got.prompt_weight} ref {want.prompt_weight}"
    assert got.candidates == want.candidates, f"{case}: m urlvr {got.candidates} reference {want.candidates}"
    if want.candidates:
        lw = label_weights([c / len(voters) for c in _counts(voters)], settings)
        assert len(lw) == len(want.weights)
        for g, w in zip(lw, want.weights):
            assert not math.isnan(g), case
            assert close(g, w), f"{case}: weight urlvr {g!r} reference {w!r}"
    return want


def _counts(voters: Sequence[str | None]) -> list[int]:
    counts: dict[str, int] = {}
    for v in voters:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    return list(counts.values())


# --------------------------------------------------------------------------- the reference itself
def test_reference_hand_computed():
    """The reference on a case worked by hand, so that the comparisons below compare to something right.
    voters a a b c (n 4, G 4), center 1, sigma 1, kappa 0.5: f = 1/2, 1/4, 1/4; M = 2 = kappa·n, not penalised."""
    want = ref_restrain(["a", "a", "b", "c"], ["a", "a", "b", "c"], sigma=1.0, center=1.0, kappa=0.5,
                        delta=0.5, share=None)
    ga, gb = math.exp(-0.125), math.exp(-0.28125)
    wa, wb = ga / (ga + 2 * gb), gb / (ga + 2 * gb)
    # r_a = 1 1 0 0: mean 1/2, unbiased std sqrt(1/3); r_b = 0 0 1 0: mean 1/4, std 1/2
    sa, sb = math.sqrt(1.0 / 3.0) + EPS, 0.5 + EPS
    a_pos, a_neg = 0.5 / sa, -0.5 / sa
    b_pos, b_neg = 0.75 / sb, -0.25 / sb
    hand = [wa * a_pos + 2 * wb * b_neg, wa * a_pos + 2 * wb * b_neg,
            wa * a_neg + wb * b_pos + wb * b_neg, wa * a_neg + wb * b_neg + wb * b_pos]
    assert not want.penalized and want.candidates == 3
    for x, y in zip(want.advantages, hand):
        assert math.isclose(x, y, rel_tol=1e-14, abs_tol=1e-15)
    assert ref_reference_share(["a", None, "a", "b"]) == 0.5
    assert ref_reference_share([]) == 0.0 and ref_reference_share([None, None]) == 0.0


# --------------------------------------------------------------------------- single cases
@pytest.mark.parametrize("center", [0.0, 1.0])
def test_two_two_tie(center):
    want = check(["a", "a", "b", "b"], ["a", "a", "b", "b"], center=center, kappa=0.5)
    assert want.weights == [0.5, 0.5]
    # equal weights on mirrored reward vectors cancel: every advantage is 0
    assert all(abs(x) < 1e-12 for x in want.advantages)


def test_four_way_tie():
    check(["a", "b", "c", "d"], ["a", "b", "c", "d"], kappa=0.25)  # M 1 = 0.25·4: not penalised
    want = check(["a", "b", "c", "d"], ["a", "b", "c", "d"], kappa=0.3)  # M 1 < 1.2: penalised
    assert want.penalized and want.advantages == [-0.5] * 4


@pytest.mark.parametrize("kappa", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("size", [1, 2, 5])
def test_no_answers(kappa, size):
    want = check([None] * size, [None] * size, kappa=kappa, delta=0.75)
    if kappa > 0:
        assert want.penalized and want.advantages == [-0.75] * size
    else:
        assert not want.penalized and want.candidates == 0 and want.advantages == [0.0] * size


@pytest.mark.parametrize("answer,kappa", [
    ("a", 0.0), ("a", 0.3), ("a", 1.0),
    (None, 0.0), (None, 0.3), (None, 1.0),
])
def test_single_sample(answer, kappa):
    check([answer], [answer], kappa=kappa)
    check([answer], [answer], kappa=kappa, share=0.4)


@pytest.mark.parametrize("size", [1, 3, 8])
@pytest.mark.parametrize("kappa", [0.0, 0.5, 1.0])
def test_all_equal_answers(size, kappa):
    """One candidate with f = 1: M = n is never < kappa·n, and a constant reward gives 0."""
    want = check(["x"] * size, ["x"] * size, kappa=kappa, share=0.3)
    assert not want.penalized and want.candidates == 1 and want.advantages == [0.0] * size


def test_voters_longer_than_answers():
    """Extra voters change f_j and M; rewards are over the trained samples only."""
    answers = ["a", "b", "b", "c"]
    base = check(answers, answers, kappa=0.5)  # M 2 of 4: not penalised
    more = check(answers + ["a", "a", "a", "d"], answers, kappa=0.5)  # f_a 4/8
    assert base.advantages != more.advantages
    check(answers + ["e", "f", "g", "h"], answers, kappa=0.5)  # M 2 < 4: penalised
    # a candidate seen only among the extra voters has a constant (all-zero) reward over the trained ones
    check(answers + ["z"] * 6, answers, kappa=0.3)


def test_some_none():
    check(["a", None, "a", "b", None, "a"], ["a", None, "a", "b", None, "a"], kappa=0.5)
    check(["a", None, "b", None], ["a", None, "b", None], kappa=0.25)
    check(["a", None, None, None, "a", "a"], ["a", None, None], kappa=0.5)


@pytest.mark.parametrize("voters,kappa,penalized", [
    (["a", "a", "b", "c"], 0.5, False),  # M 2 == 0.5·4 exactly
    (["a", "b", "c", "d"], 0.5, True),  # M 1 < 2
    (["a", "a", "a", "b", "c", "d", "e", "f"], 0.375, False),  # M 3 == 0.375·8
    (["a", "a", "b", "b", "c", "d", "e", "f"], 0.375, True),  # M 2 < 3
    (["a", "a", "b", "b"], 0.5, False),
    (["a", "a", "a", "a"], 1.0, False),  # M 4 == 1.0·4
    (["a", "a", "a", None], 1.0, True),
    (["a", None, None, None], 0.25, False),  # M 1 == 0.25·4, None counts in n
    # kappa · n rounds above the integer in float64 (0.28 · 25 = 7.000000000000001): M == kappa · n still holds
    (["a"] * 7 + [str(i) for i in range(18)], 0.28, False),
    (["a"] * 14 + [str(i) for i in range(11)], 0.56, False),
    (["a"] * 7 + [str(i) for i in range(93)], 0.07, False),
    (["a"] * 6 + [str(i) for i in range(19)], 0.28, True),  # M 6 < 7
])
def test_kappa_boundary(voters, kappa, penalized):
    want = check(voters, voters, kappa=kappa)
    assert want.penalized is penalized


@pytest.mark.parametrize("center", [0.0, 1.0])
def test_tiny_sigma(center):
    """sigma 1e-3 underflows every g(f) to 0 unless f == center: the weights are still the ratio's limit,
    one-hot on (uniform over) the candidates whose share is nearest the centre, never NaN."""
    voters = ["a", "a", "a", "b", "b", "c", "a", "b"]
    answers = voters[:6]
    want = check(voters, answers, sigma=1e-3, center=center, kappa=0.25, share=0.5)
    near = [1.0, 0.0, 0.0] if center == 1.0 else [0.0, 0.0, 1.0]  # f = 4/8, 3/8, 1/8
    assert want.weights == near
    assert want.prompt_weight == 0.0  # g(0.5) underflows: u is 0 here, and so is every advantage
    check(voters, answers, sigma=1e-3, center=center, kappa=0.25)
    # a tie at the top: uniform over the tied candidates
    tie = ["a", "a", "b", "b", "c"]
    want = check(tie, tie, sigma=1e-3, center=1.0, kappa=0.2)
    assert want.weights == [0.5, 0.5, 0.0]


@pytest.mark.parametrize("center", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("share", [None, 0.0, 0.25, 0.6, 1.0])
def test_center_and_prompt_weighting(center, share):
    voters = ["a", "b", "a", "c", None, "a", "b", "d"]
    check(voters, voters[:5], sigma=0.3, center=center, kappa=0.3, delta=0.5, share=share)
    check(voters, voters[:5], sigma=0.3, center=center, kappa=0.5, delta=0.5, share=share)  # penalised


@pytest.mark.parametrize("answers", [
    [], [None], [None, None], ["a"], ["a", "b"], ["a", "a", "b", None], ["", "", None, "x"],
    ["1", "1.0", "1", " 1"],
])
def test_reference_share(answers):
    assert close(reference_share(answers), ref_reference_share(answers))


HUGE_A = "7" * 100_000
HUGE_B = "7" * 99_999 + "8"


@pytest.mark.parametrize("answers", [
    ["", "", "a", None],  # the empty string is an answer, not a missing one
    ["1", "1.0", "1", "01"],  # distinct strings are distinct answers
    ["\u00e9", "e\u0301", "\u00e9", "\u00e9"],  # precomposed vs combining accent
    ["\U0001f600", "\u202e1", "\x00", "\U0001f600"],
    ["nan", "NaN", "inf", "nan"],
    [HUGE_A, HUGE_B, HUGE_A, None],
    [HUGE_A, HUGE_A, HUGE_A, HUGE_B],
    ["None", None, "None", "null"],
    [" 1", "1 ", "1", "1"],
])
@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_adversarial_answers(answers, kappa):
    check(answers, answers, kappa=kappa)
    check(answers + ["1", "", HUGE_B], answers, kappa=kappa, share=ref_reference_share(answers))
    assert close(reference_share(answers), ref_reference_share(answers))


ALPHABET = ["a", "b", "c", "1", "1.0", "", None]


def test_randomised_sweep():
    """400 seeded groups: G 1..9, 0..9 extra voters, random settings; every value against the reference."""
    rng = random.Random(2510_02172)
    penalized = unpenalized = 0
    for _ in range(400):
        group = rng.randint(1, 9)
        answers = [rng.choice(ALPHABET[: rng.randint(1, len(ALPHABET))]) for _ in range(group)]
        if rng.random() < 0.1:
            answers = [None] * group
        voters = answers + [rng.choice(ALPHABET) for _ in range(rng.randint(0, 9))]
        share = rng.choice([None, None, rng.random(), ref_reference_share(
            [rng.choice(ALPHABET) for _ in range(rng.randint(0, 8))])])
        want = check(voters, answers, sigma=rng.choice([1e-3, 0.05, 0.3, 1.0, 5.0]),
                     center=rng.choice([0.0, 0.25, 0.5, 1.0, rng.random()]),
                     kappa=rng.choice([0.0, 0.25, 0.3, 0.5, 0.75, 1.0, rng.random()]),
                     delta=rng.choice([0.0, 0.5, 1.0, 2.0]), share=share)
        penalized += want.penalized
        unpenalized += not want.penalized
    assert penalized > 50 and unpenalized > 50  # both branches well covered


# --------------------------------------------------------------------------- the batch shaper
@pytest.mark.parametrize("prompt_weighting", [True, False])
@pytest.mark.parametrize("seed,kappa", [(0, 0.375), (1, 0.375), (2, 0.375), (3, 0.0), (4, 0.0),
                                        (5, 0.0)])
def test_batch_shaper_rows(prompt_weighting, seed, kappa):
    """Row by row the per-group reference; the metrics their definitions. Seed 5 with kappa 0 has a prompt
    whose voters all lack an answer: its row must be zeros."""
    rng = random.Random(seed)
    sigma, center, delta = rng.choice([1e-3, 0.3, 1.0]), rng.choice([0.0, 1.0]), 0.5
    batch, group, votes = 7, 5, 8
    prompt_ids = [f"p{b}" for b in range(batch)]
    answers = [[rng.choice(ALPHABET) for _ in range(group)] for _ in range(batch)]
    answers[0] = [None] * group  # penalised when kappa > 0
    answers[1] = ["x"] * group  # one candidate
    voters = [row + [rng.choice(ALPHABET) for _ in range(votes - group)] for row in answers]
    voters[1] = ["x"] * votes
    voters[0] = [None] * votes if seed == 5 else voters[0]
    state = {pid: {"reference_share": ref_reference_share([rng.choice(ALPHABET) for _ in range(6)])}
             for pid in prompt_ids} if prompt_weighting else {}
    incoming = torch.randn(batch, group, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    shaper = RestrainShaping(sigma=sigma, center=center, kappa=kappa, delta=delta,
                             prompt_weighting=prompt_weighting)
    out, new_state, metrics = shaper.shape(state, prompt_ids, voters, answers, incoming.clone(),
                                           random.Random(0), estimate=estimate)
    assert out.shape == (batch, group) and out.dtype == torch.float64
    assert new_state == state
    rows = [ref_restrain(voters[b], answers[b], sigma=sigma, center=center, kappa=kappa, delta=delta,
                         share=state[prompt_ids[b]]["reference_share"] if prompt_weighting else None)
            for b in range(batch)]
    for b, want in enumerate(rows):
        for i in range(group):
            got = out[b, i].item()
            assert close(got, want.advantages[i]), f"row {b} sample {i}: urlvr {got!r} ref {want.advantages[i]!r}"
    assert set(metrics) >= {"restrain/penalized_fraction", "restrain/prompt_weight_mean",
                            "restrain/candidates_mean"}
    assert close(metrics["restrain/penalized_fraction"], sum(w.penalized for w in rows) / batch)
    assert close(metrics["restrain/prompt_weight_mean"], math.fsum(w.prompt_weight for w in rows) / batch)
    assert close(metrics["restrain/candidates_mean"], sum(w.candidates for w in rows) / batch)
    assert not rows[1].penalized and rows[0].penalized == (kappa > 0)
