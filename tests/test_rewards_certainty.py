"""Certainty rewards (paper Table 1) vs an independent float64 reference on random logits.

The rewards read token statistics computed by the trainer's float32 path
(`compute_token_stats`); the reference recomputes every formula from the logits in plain Python
float64, token by token, so the two share no code.
"""

import math

import pytest
import torch

from urlvr.rewards.base import RewardContext
from urlvr.rewards.certainty import (
    probability,
    probability_disparity,
    self_certainty,
    token_entropy,
    token_range_for_chars,
    trajectory_entropy,
)
from urlvr.rewards.extractors import extract_boxed
from urlvr.rollout.base import Group, PromptInput, Sample
from urlvr.algorithms.token_stats import BUILTIN_TOKEN_STATS as SCORE_STATS
from urlvr.algorithms.token_stats import compute_token_stats

G, T, V = 4, 7, 13
LENGTHS = [7, 3, 1, 0]  # full, partial, one token, empty response


def random_case(seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(G, T, V, generator=gen, dtype=torch.float64) * scale
    targets = torch.randint(0, V, (G, T), generator=gen)
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in LENGTHS])
    stats = compute_token_stats(logits.float(), targets, SCORE_STATS)  # the trainer's float32 path
    return logits, targets, mask, stats


def softmax64(row):
    z = [float(v) for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [math.exp(v - lse) for v in z]


def reference(logits, targets, mask, vocab=V):
    """Per sample: each Table 1 formula, in float64 from the logits."""
    out = {k: [] for k in ("self_certainty", "token_entropy", "trajectory_entropy", "probability", "disparity")}
    for j in range(G):
        kl, ent, logp, gap = [], [], [], []
        for t in range(T):
            if mask[j, t] == 0:
                continue
            p = softmax64(logits[j, t])
            kl.append(sum((1 / vocab) * math.log((1 / vocab) / q) for q in p))
            ent.append(-sum(q * math.log(q) for q in p))
            logp.append(math.log(p[int(targets[j, t])]))
            top = sorted(p, reverse=True)
            gap.append(top[0] - top[1])
        n = len(kl)
        mean = (lambda xs: sum(xs) / n) if n else (lambda xs: 0.0)
        out["self_certainty"].append(mean(kl))
        out["token_entropy"].append(-mean(ent))
        out["trajectory_entropy"].append(mean(logp))
        out["probability"].append(math.exp(sum(logp)) if n else 0.0)
        out["disparity"].append(mean(gap))
    return out


def make_group(texts=None, token_ids=None):
    texts = texts or [""] * G
    token_ids = token_ids or [(1,)] * G
    samples = tuple(Sample(tuple(ids), (0.0,) * len(ids), text, "eos") for ids, text in zip(token_ids, texts))
    return Group(PromptInput("p", "q", (5,)), samples)


def make_ctx(stats, mask, answers=(None,) * G, tokenizer=None):
    return RewardContext(answers=tuple(answers), response_mask=mask, token_stats=stats,
                         extract_answer=extract_boxed, tokenizer=tokenizer)


@pytest.mark.parametrize("seed, scale", [(0, 3.0), (1, 0.3), (2, 12.0)])
def test_certainty_rewards_match_float64_reference(seed, scale):
    logits, targets, mask, stats = random_case(seed, scale)
    ref = reference(logits, targets, mask)
    group, ctx = make_group(), make_ctx(stats, mask)
    for fn, key in [(self_certainty, "self_certainty"), (token_entropy, "token_entropy"),
                    (trajectory_entropy, "trajectory_entropy"), (probability, "probability")]:
        got = fn(group, ctx)
        assert got == pytest.approx(ref[key], rel=1e-5, abs=1e-5), key
    got = probability_disparity(group, ctx, span="response").scores
    assert got == pytest.approx(ref["disparity"], rel=1e-5, abs=1e-6)


def test_certainty_rewards_with_masked_vocabulary_entries_match_float64_reference():
    """Logits at -inf (a masked vocabulary, at T = 0.7): rewards finite; entropy with 0 log 0 = 0,
    self-certainty with U over the unmasked entries (the convention in trainer/token_stats.py)."""
    logits, targets, mask, _ = random_case(seed=4)
    masked = torch.arange(V) % 3 == 2  # never a sampled target below
    targets = targets - (targets % 3 == 2).long()
    logits = logits.masked_fill(masked, -math.inf) / 0.7
    stats = compute_token_stats(logits.float(), targets, SCORE_STATS)
    group, ctx = make_group(), make_ctx(stats, mask)
    kept = int((~masked).sum())
    ref = reference(logits[..., ~masked], torch.tensor([[int((~masked)[:v].sum()) for v in row] for row in targets]),
                    mask, vocab=kept)  # the same distribution over the unmasked entries only
    for fn, key in [(self_certainty, "self_certainty"), (token_entropy, "token_entropy"),
                    (trajectory_entropy, "trajectory_entropy"), (probability, "probability")]:
        got = fn(group, ctx)
        assert all(math.isfinite(v) for v in got), key
        assert got == pytest.approx(ref[key], rel=1e-5, abs=1e-5), key


def test_empty_response_scores_zero_everywhere():
    _, _, mask, stats = random_case()
    group, ctx = make_group(), make_ctx(stats, mask)
    for fn in (self_certainty, token_entropy, trajectory_entropy, probability):
        assert fn(group, ctx)[3] == 0.0
    assert probability_disparity(group, ctx, span="response").scores[3] == 0.0


def test_signs_and_ranges():
    logits, targets, mask, stats = random_case()
    group, ctx = make_group(), make_ctx(stats, mask)
    assert all(v >= 0 for v in self_certainty(group, ctx))  # KL >= 0
    assert all(v <= 0 for v in token_entropy(group, ctx))  # -H <= 0
    assert all(0 <= v <= 1 for v in probability(group, ctx))


def test_a_peaked_distribution_is_more_certain_than_a_flat_one():
    logits = torch.zeros(2, 1, V, dtype=torch.float64)
    logits[0, 0, 3] = 20.0  # row 0 nearly one-hot on token 3, row 1 uniform
    targets = torch.full((2, 1), 3)
    stats = compute_token_stats(logits, targets, SCORE_STATS)
    group = Group(PromptInput("p", "q", (5,)), make_group().samples[:2])
    ctx = RewardContext(answers=(None, None), response_mask=torch.ones(2, 1), token_stats=stats, extract_answer=str)
    sc, te, tr = self_certainty(group, ctx), token_entropy(group, ctx), trajectory_entropy(group, ctx)
    lse = math.log(math.exp(20.0) + V - 1)  # KL(U || pi) = lse(z) - mean(z) - log V
    assert sc[0] == pytest.approx(lse - 20.0 / V - math.log(V), abs=1e-9) and sc[1] == pytest.approx(0.0, abs=1e-12)
    assert te[0] > te[1] and tr[0] > tr[1]
    assert probability(group, ctx) == pytest.approx([math.exp(20.0 - lse), 1 / V], abs=1e-12)
    assert probability_disparity(group, ctx, span="response").scores == pytest.approx([1.0, 0.0], abs=1e-6)


class CharTokenizer:
    """Decodes ids to characters (id i -> chr(i)); multi-char tokens via an explicit table."""

    def __init__(self, table=None):
        self.table = table or {}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.table.get(i, chr(i)) for i in ids)


def test_disparity_on_answer_tokens_only():
    text = "x=\\boxed{42} ok"
    ids = [ord(c) for c in text]
    n = len(ids)
    gap = torch.zeros(G, n)
    first = text.index("42")
    gap[0, first], gap[0, first + 1] = 0.5, 0.3  # the two answer tokens; other tokens get 0.9
    gap[0, :first] = 0.9
    stats = {"top1_prob": gap, "top2_prob": torch.zeros(G, n)}
    group = make_group(texts=[text, "no answer", text, text], token_ids=[ids, [1], ids, ids])
    mask = torch.ones(G, n)
    answers = ("42", None, "42", "42")
    out = probability_disparity(group, make_ctx(stats, mask, answers, CharTokenizer()))
    assert out.scores[0] == pytest.approx(0.4)  # mean over the 2 answer tokens only
    assert out.scores[1] == 0.0  # no answer: nothing to score
    assert out.diagnostics["scored_tokens"][0] == 2.0
    with pytest.raises(ValueError, match="tokenizer"):
        probability_disparity(group, make_ctx(stats, mask, answers, None))


def test_token_range_handles_multi_character_tokens():
    # tokens: "ab" "\boxed{" "1" "23" "}" -> the answer "123" spans tokens 2 and 3
    table = {1: "ab", 2: "\\boxed{", 3: "1", 4: "23", 5: "}"}
    ids = [1, 2, 3, 4, 5]
    text = CharTokenizer(table).decode(ids)
    start = text.index("123")
    assert token_range_for_chars(ids, CharTokenizer(table), start, start + 3) == (2, 4)


def test_scorer_lends_raw_logit_statistics_from_the_same_pass(random_tiny_model):
    from urlvr.trainer.actor import TokenScorer

    _, model, _ = random_tiny_model
    scorer = TokenScorer(model, chunk_size=3)
    input_ids = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(4))
    attention = torch.ones_like(input_ids)
    positions = attention.cumsum(-1) - 1
    with torch.no_grad():
        both = scorer(input_ids, attention, positions, 4, 0.7, SCORE_STATS, raw_stats=SCORE_STATS)
        at_one = scorer(input_ids, attention, positions, 4, 1.0, SCORE_STATS)
        scaled = scorer(input_ids, attention, positions, 4, 0.7, SCORE_STATS)
    for name in SCORE_STATS:
        torch.testing.assert_close(both[f"raw_{name}"], at_one[name])  # raw = temperature 1
        torch.testing.assert_close(both[name], scaled[name])  # the scaled ones are unchanged
    assert not torch.allclose(both["entropy"], both["raw_entropy"])
