"""SCOPE and EVOL-RL (issue 23's reward zoo) against float64 reference loops written from the
papers' definitions (plain Python lists, no urlvr code): ties, no answers, a single sample,
all-equal answers, and responses of different lengths (padding)."""

from __future__ import annotations

import math
import random

import pytest
import torch

import urlvr.builtins  # noqa: F401
from urlvr.algorithms.token_stats import compute_token_stats
from urlvr.rewards.base import REWARDS, RewardContext, call_reward, check_reward_kwargs
from urlvr.rewards.compose import run_term
from urlvr.rewards.evol_rl import EMBEDDERS, evol_rl, novelty_rewards, tfidf_embed
from urlvr.rewards.scope import candidate_sizes, pareto_choice, scope, step_spans
from urlvr.rollout.base import Group, PromptInput, Sample

V = 11
STEP = 0  # the token id whose text is the step delimiter "\n\n"


class StepTokenizer:
    """Token 0 decodes to a blank line (a step ends), every other id to a word."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join("\n\n" if i == STEP else f"w{i} " for i in ids)


def make_group(texts, token_ids):
    samples = tuple(Sample(token_ids=tuple(ids), logprobs=tuple(0.0 for _ in ids), text=t, finish_reason="stop")
                    for t, ids in zip(texts, token_ids))
    return Group(prompt=PromptInput(prompt_id="p0", text="q", token_ids=(1, 2)), samples=samples)


def make_case(answers, lengths, seed=0, texts=None):
    """A group whose responses have the given lengths (padded to the longest) and random logits."""
    gen = torch.Generator().manual_seed(seed)
    G, T = len(answers), max(max(lengths), 1)
    logits = torch.randn(G, T, V, generator=gen, dtype=torch.float64) * 2.0
    targets = torch.randint(0, V, (G, T), generator=gen)
    for j in range(G):  # a step delimiter every third token, so responses have several steps
        for t in range(2, T, 3):
            targets[j, t] = STEP
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths])
    stats = compute_token_stats(logits.float(), targets, ("logprob", "top1_prob", "top2_prob"))
    token_ids = [targets[j, :n].tolist() for j, n in enumerate(lengths)]
    group = make_group(texts or [f"answer {a}" for a in answers], token_ids)
    ctx = RewardContext.for_group(answers, mask, extract_answer=lambda s: None, token_stats=stats,
                                  tokenizer=StepTokenizer())
    return group, ctx, logits, token_ids


# --------------------------------------------------------------------------- SCOPE reference
def ref_token_conf(row, target, k):
    z = [float(v) for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    logp = sorted((v - lse for v in z), reverse=True)
    if k == 0:
        return -(z[target] - lse)
    return -sum(logp[:k]) / k


def ref_confidence(logits_j, ids, k):
    """Average over steps (a step closes with the delimiter token) of the mean token confidence."""
    steps, current = [], []
    for t, tok in enumerate(ids):
        current.append(ref_token_conf(logits_j[t], tok, k))
        if tok == STEP:
            steps.append(current)
            current = []
    if current:
        steps.append(current)
    return sum(sum(s) / len(s) for s in steps) / len(steps) if steps else 0.0


def ref_scope_all_voters(answers, confs):
    """votes_per_subgroup = G: every subgroup's label is the confidence-weighted vote of all."""
    totals = {}
    for a, c in zip(answers, confs):
        if a is not None:
            totals[a] = totals.get(a, 0.0) + c
    label = None
    for a, c in totals.items():  # first seen wins a tie
        if label is None or c > totals[label]:
            label = a
    return [1.0 if a is not None and a == label else 0.0 for a in answers]


CASES = {
    "plain": (["1", "2", "1", "3"], [7, 3, 5, 1]),
    "tie": (["1", "2", "2", "1"], [4, 4, 6, 2]),
    "no_answers": ([None, None, None], [3, 1, 2]),
    "single_sample": (["5"], [4]),
    "all_equal": (["7", "7", "7", "7"], [2, 6, 1, 5]),
    "some_missing_and_empty": (["4", None, "4", "9"], [5, 0, 3, 6]),
}


@pytest.mark.parametrize("top_k", [0, 1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_scope_matches_the_reference_when_every_sample_votes(case, top_k):
    answers, lengths = CASES[case]
    group, ctx, logits, ids = make_case(answers, lengths, seed=len(case))
    confs = [ref_confidence(logits[j], ids[j], top_k) for j in range(len(answers))]
    out = call_reward(REWARDS.get("scope"), group, ctx, {"top_k": top_k, "votes_per_subgroup": len(answers)})
    assert out.scores == ref_scope_all_voters(answers, confs)
    assert out.diagnostics["step_confidence"] == pytest.approx(confs, rel=1e-5, abs=1e-5)


def test_scope_confidence_weights_beat_counts():
    """Two samples say "a", one says "b": the vote goes to "b" when its confidence outweighs both."""
    group, ctx, logits, ids = make_case(["a", "a", "b"], [3, 3, 3], seed=3)
    confs = [ref_confidence(logits[j], ids[j], 0) for j in range(3)]
    expected = ref_scope_all_voters(["a", "a", "b"], confs)
    assert scope(group, ctx, votes_per_subgroup=3).scores == expected
    # make sample 2 far less confident-by-surprisal than the others, then far more
    for scale, winner in ((1e-3, "a"), (1e3, "b")):
        stats = dict(ctx.token_stats)
        stats["logprob"] = ctx.token_stats["logprob"].clone()
        stats["logprob"][2] = stats["logprob"][2] * scale
        out = scope(group, RewardContext.for_group(ctx.answers, ctx.response_mask, extract_answer=lambda s: None,
                                                   token_stats=stats, tokenizer=StepTokenizer()), votes_per_subgroup=3)
        assert out.scores == [float(a == winner) for a in ["a", "a", "b"]]


def test_scope_subgroups_carry_one_label_each_and_the_draw_is_reproducible():
    answers = ["1", "2", "3", "1", "2", "3", "1", "1"]
    group, ctx, _, _ = make_case(answers, [5, 2, 7, 3, 4, 6, 1, 5], seed=5)
    first = scope(group, ctx, subgroup_size=2, votes_per_subgroup=3, seed=1)
    assert first.scores == scope(group, ctx, subgroup_size=2, votes_per_subgroup=3, seed=1).scores
    assert set(first.diagnostics["subgroup_size"]) == {2.0}
    # within a subgroup the label is shared: two samples with the same answer score alike
    spec = REWARDS.get("scope")
    prepared = spec.prepare([group], [ctx], None, subgroup_size=2, votes_per_subgroup=3, seed=1)[0]
    assert all(prepared.labels[i] == prepared.labels[i + 1] for i in range(0, 8, 2))
    assert first.scores == [float(a == lab) for a, lab in zip(answers, prepared.labels)]


def test_scope_each_subgroup_label_is_the_weighted_vote_of_some_drawn_subset():
    """The bootstrap: every subgroup's label is the confidence-weighted vote of some subset of
    `votes_per_subgroup` samples (checked by enumerating all subsets in the reference)."""
    from itertools import combinations

    answers = ["1", "2", "3", None, "2", "1"]
    group, ctx, logits, ids = make_case(answers, [4, 6, 2, 5, 3, 1], seed=9)
    confs = [ref_confidence(logits[j], ids[j], 0) for j in range(6)]

    def ref_vote(subset):
        totals = {}
        for i in subset:
            if answers[i] is not None:
                totals[answers[i]] = totals.get(answers[i], 0.0) + confs[i]
        best = None
        for a, c in totals.items():
            if best is None or c > totals[best]:
                best = a
        return best

    possible = {ref_vote(sub) for sub in combinations(range(6), 3)}
    for seed in range(5):
        prepared = REWARDS.get("scope").prepare([group], [ctx], None, subgroup_size=2, votes_per_subgroup=3, seed=seed)[0]
        assert prepared.subgroup_size == 2 and set(prepared.labels) <= possible
        assert all(prepared.labels[i] == prepared.labels[i + 1] for i in (0, 2, 4))


def ref_pareto(rates, divs, lam):
    n = len(rates)
    front = []
    for i in range(n):
        dominated = False
        for j in range(n):
            if j != i and rates[j] >= rates[i] and divs[j] >= divs[i] and (rates[j] > rates[i] or divs[j] > divs[i]):
                dominated = True
        if not dominated:
            front.append(i)
    rl, rh = min(rates[i] for i in front), max(rates[i] for i in front)
    dl, dh = min(divs[i] for i in front), max(divs[i] for i in front)
    dist = {i: math.sqrt(lam * (1 - (rates[i] - rl) / (rh - rl + 1e-8)) ** 2
                         + (1 - lam) * (1 - (divs[i] - dl) / (dh - dl + 1e-8)) ** 2) for i in front}
    return min(front, key=lambda i: (dist[i], i))


def test_scope_pareto_choice_matches_the_reference():
    assert pareto_choice([0.9, 0.8, 0.5, 0.4], [1.0, 1.5, 3.0, 2.0], 0.7) == ref_pareto([0.9, 0.8, 0.5, 0.4], [1.0, 1.5, 3.0, 2.0], 0.7)
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 7)
        rates = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(n)]
        divs = [float(rng.randint(1, 4)) for _ in range(n)]
        lam = rng.random()
        assert pareto_choice(rates, divs, lam) == ref_pareto(rates, divs, lam)
    assert candidate_sizes(64) == [1, 2, 4, 8, 16, 32, 64] and candidate_sizes(6) == [1, 2, 6]


def test_scope_batch_phase_searches_the_subgroup_size_over_the_batch():
    groups, contexts = [], []
    for seed, answers in enumerate((["1", "2", "1", "2"], ["3", "3", "4", None])):
        g, c, _, _ = make_case(answers, [3, 5, 2, 4], seed=seed)
        groups.append(g)
        contexts.append(c)
    scores, diag, failed, _ = run_term(REWARDS.get("scope"), {"votes_per_subgroup": 2}, groups, contexts, None, "raise")
    assert failed == 0 and scores.shape == (2, 4)
    sizes = set(diag["subgroup_size"].flatten().tolist())
    assert len(sizes) == 1 and sizes <= {1.0, 2.0, 4.0}  # one size for the whole batch


def test_scope_step_spans_and_load_checks():
    assert step_spans(["a", "\n\n", "b", "c\n\nd", "e"], "\n\n") == [(0, 2), (2, 4), (4, 5)]
    assert step_spans([], "\n\n") == []
    for bad in ({"top_k": 5}, {"lam": 1.5}, {"subgroup_size": 0}, {"votes_per_subgroup": 0}, {"step_delimiter": ""}):
        with pytest.raises(ValueError):
            check_reward_kwargs("scope", bad)
    assert REWARDS.get("scope").token_stats({"top_k": 2}) == ("top1_prob", "top2_prob")
    group, ctx, _, _ = make_case(["1", "2"], [2, 3])
    with pytest.raises(ValueError, match="vote_group_size"):
        scope(group, RewardContext.for_group(ctx.answers, ctx.response_mask, extract_answer=lambda s: None,
                                             token_stats=ctx.token_stats, vote_answers=["1", "2", "1", "1"]))


# --------------------------------------------------------------------------- EVOL-RL reference
VECTORS: dict[str, list[float]] = {}


@EMBEDDERS.register("test_zoo_vectors")
def _lookup(texts):
    return torch.tensor([VECTORS[t] for t in texts], dtype=torch.float64)


def ref_evol(answers, vectors, alpha=0.5):
    """From the paper's definition: majority anchor (first seen wins a tie), novelty from the
    clipped cosine, min-max within each side, [0.5, 1] for the majority, [-1, -0.5] otherwise."""
    counts = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    maj = None
    for a, c in counts.items():
        if maj is None or c > counts[maj]:
            maj = a

    def cos(u, v):
        nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
        if nu == 0 or nv == 0:
            return 0.0
        return min(1.0, max(0.0, sum(x * y for x, y in zip(u, v)) / (nu * nv)))

    valid = [i for i, a in enumerate(answers) if a is not None]
    side = {i: answers[i] == maj for i in valid}
    nov = {}
    for i in valid:
        others = [j for j in valid if j != i]
        if not others:
            continue
        same = [j for j in others if side[j] == side[i]] or others
        mean_s = sum(cos(vectors[i], vectors[j]) for j in same) / len(same)
        max_s = max(cos(vectors[i], vectors[j]) for j in others)
        nov[i] = 1 - (alpha * mean_s + (1 - alpha) * max_s)
    out = [-1.0] * len(answers)
    for s, base in ((True, 0.5), (False, -1.0)):
        members = [i for i in valid if side[i] == s]
        for i in members:
            if len(members) == 1:
                u = 1.0
            else:
                lo, hi = min(nov[k] for k in members), max(nov[k] for k in members)
                u = 0.5 if hi == lo else (nov[i] - lo) / (hi - lo)
            out[i] = base + 0.5 * u
    return out


EVOL_CASES = {
    "plain": ["1", "1", "2", "1", "3"],
    "tie": ["2", "1", "1", "2"],
    "no_answers": [None, None, None],
    "single_sample": ["4"],
    "one_valid": [None, "4", None],
    "all_equal": ["7", "7", "7"],
    "missing": ["5", None, "5", "6", "6", "5"],
}


@pytest.mark.parametrize("case", sorted(EVOL_CASES))
def test_evol_rl_matches_the_reference(case):
    answers = EVOL_CASES[case]
    rng = random.Random(len(case))
    texts = [f"{case} response {i}" for i in range(len(answers))]
    vectors = [[rng.uniform(-1, 1) for _ in range(5)] for _ in answers]
    if case == "all_equal":
        vectors[2] = [0.0] * 5  # a zero embedding: similarity 0 to everything
    VECTORS.update(zip(texts, vectors))
    lengths = [3 + i % 4 for i in range(len(answers))]
    group, ctx, _, _ = make_case(answers, lengths, texts=texts)
    out = call_reward(REWARDS.get("evol_rl"), group, ctx, {"embedding": "test_zoo_vectors"})
    assert out.scores == pytest.approx(ref_evol(answers, vectors), abs=1e-12)
    assert all(-1.0 <= s <= 1.0 for s in out.scores)
    assert all(s >= 0.5 for s, a in zip(out.scores, answers) if a is not None and a == answers[0] and case != "tie")


def test_evol_rl_majority_outranks_minority_and_novelty_orders_within_a_side():
    answers = ["1", "1", "1", "2"]
    texts = ["the same words here", "the same words here", "a different route entirely", "other"]
    group, ctx, _, _ = make_case(answers, [4, 2, 5, 3], texts=texts)
    scores = evol_rl(group, ctx, embedding="tfidf").scores
    assert min(scores[:3]) >= 0.5 > -0.5 >= scores[3]
    assert scores[2] == 1.0 and scores[0] == scores[1] == 0.5  # the novel one tops its side


def test_evol_rl_tfidf_is_scikit_learns_smoothed_tfidf():
    out = tfidf_embed(["a b b", "b c", ""])
    idf = {"a": math.log(4 / 2) + 1, "b": math.log(4 / 3) + 1, "c": math.log(4 / 2) + 1}
    expected = [[idf["a"], 2 * idf["b"], 0.0], [0.0, idf["b"], idf["c"]], [0.0, 0.0, 0.0]]
    assert out.flatten().tolist() == pytest.approx([v for row in expected for v in row])
    assert novelty_rewards([None, None], torch.zeros(2, 2)) == [-1.0, -1.0]


def test_evol_rl_refuses_at_load_without_its_embedder(monkeypatch):
    import sys

    with pytest.raises(Exception, match="embedder"):
        check_reward_kwargs("evol_rl", {"embedding": "nope"})
    with pytest.raises(ValueError):
        check_reward_kwargs("evol_rl", {"embedding": "tfidf", "alpha": 2.0})
    check_reward_kwargs("evol_rl", {})  # wordllama comes with the dev extra
    monkeypatch.setitem(sys.modules, "wordllama", None)  # as if not installed: import raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'urlvr\[evol\]'"):
        check_reward_kwargs("evol_rl", {})
    check_reward_kwargs("evol_rl", {"embedding": "tfidf"})  # the dependency-free embedder needs nothing


def test_evol_rl_default_embedder_runs_offline_on_cpu(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the weights and tokenizer come from the wheel, never the hub
    from urlvr.rewards.evol_rl import wordllama_embed
    vectors = wordllama_embed(["2 + 3 = 5", "adding two and three gives five", "Paris is in France"])
    assert vectors.shape == (3, 256) and torch.isfinite(vectors).all()
    group, ctx, _, _ = make_case(["5", "5", "6"], [3, 4, 2], texts=["2 + 3 = 5", "two and three make 5", "6"])
    scores = evol_rl(group, ctx).scores
    assert scores[0] >= 0.5 and scores[1] >= 0.5 and scores[2] == -0.5


# --------------------------------------------------------------------------- the zoo recipes
@pytest.mark.parametrize("name", ["scope", "evol-rl"])
def test_zoo_recipe_runs_two_steps_on_the_tiny_model(name, tmp_path, monkeypatch):
    import json
    from pathlib import Path

    import urlvr
    from urlvr.recipe import load_recipe

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    recipe = load_recipe(repo / "recipes" / "zoo" / f"{name}.yaml", [f"output_dir={tmp_path / 'run'}", "logging.console=false"])
    term = {"scope": "scope", "evol-rl": "evol_rl"}[name]
    assert [t.name for t in recipe.reward.terms] == [term] and recipe.model.path == "urlvr/tiny"
    result = urlvr.train(recipe)
    assert [m["step"] for m in result.metrics] == [1, 2]
    assert all(f"reward/{term}_mean" in m for m in result.metrics), sorted(result.metrics[0])
    assert all(m["dynamics/answer_rate"] > 0 for m in result.metrics)
    # the documented run trains (scope's used to vote one cut-off answer, "7+4: 7+4" -> 4, in
    # every group: zero variance, grad_norm 0 at both steps)
    assert any(m["reward/zero_variance_group_fraction"] < 1.0 and m["actor/grad_norm"] > 0 for m in result.metrics)
    rows = [json.loads(line) for line in (result.run_dir / "completions.jsonl").read_text().splitlines()]
    assert rows


def test_scope_labels_an_empty_batch_and_the_probe_scores_it_by_default():
    """A rank with no group this round, and the probe's dry run of every batch phase, hand scope an
    empty batch: it labelled nothing by raising IndexError, so `urlvr probe` left it out."""
    from urlvr.commands.probe import default_rewards
    from urlvr.rewards.scope import prepare_scope

    assert prepare_scope([], [], None) == []
    names, skipped = default_rewards({})
    assert {"scope", "cuma", "evol_rl"} <= set(names) and "scope" not in skipped
