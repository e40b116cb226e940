"""The per-row reproducible draw (``inverse_cdf_draw``, reached through ``sample_next_tokens`` with
one generator per row) against a float64 reference written here, a chi-square test, zero-mass
tokens, batch composition, top-k/top-p renormalisation and Gemma's 262,144-token vocabulary."""

from __future__ import annotations

import itertools

import numpy
import torch

from urlvr.rollout.base import SamplingParams
from urlvr.rollout.transformers_engine import inverse_cdf_draw, sample_next_tokens


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def reference_draw(row: torch.Tensor, generator: torch.Generator) -> int:
    """token = the first v whose running float64 sum exceeds u * total, u ~ U[0, 1) drawn from
    ``generator`` (one float64 uniform, as the engine's contract says); a plain Python loop."""
    u = torch.rand((), dtype=torch.float64, generator=generator).item()
    running = list(itertools.accumulate(float(p) for p in row.tolist()))  # float64, left to right
    target = u * running[-1]
    for v, partial_sum in enumerate(running):
        if partial_sum > target:
            return v
    raise AssertionError("no token drawn: u * total reached the total")


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Survival function of chi^2 with (bins - 1) degrees of freedom at Pearson's statistic."""
    expected = probs.double() * counts.sum()
    statistic = ((counts.double() - expected) ** 2 / expected).sum()
    dof = probs.numel() - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2).item()


def test_draw_equals_a_float64_reference_loop_token_for_token():
    """Each row's token is the reference's: same generator seed, same uniform, first v with
    F(v) > u * F(V-1). Rows of different, unnormalised weights, zeros included."""
    torch.manual_seed(0)
    probs = torch.rand(64, 37) ** 3  # [A, V], skewed, unnormalised
    probs[::3, 5:9] = 0.0
    seeds = range(100, 164)
    got = inverse_cdf_draw(probs, generators(seeds))
    want = [reference_draw(row, g) for row, g in zip(probs, generators(seeds))]
    assert got.tolist() == want


def test_frequencies_pass_a_chi_square_test():
    """20k rows of one distribution, one generator each: Pearson's chi-square against the
    probabilities is not rejected at 1e-4 (a draw biased by 2 points on two tokens is, see the sanity check)."""
    probs = torch.tensor([0.30, 0.25, 0.15, 0.10, 0.08, 0.06, 0.04, 0.02])
    draws = 20_000
    tokens = inverse_cdf_draw(probs.repeat(draws, 1), generators(range(draws)))
    counts = torch.bincount(tokens, minlength=probs.numel())
    assert chi_square_p_value(counts, probs) > 1e-4, counts
    skewed = probs + torch.tensor([0.02, -0.02, 0, 0, 0, 0, 0, 0])  # the test has power
    assert chi_square_p_value(counts, skewed) < 1e-4


def test_zero_probability_tokens_are_never_drawn_even_at_the_row_edges():
    """First and last vocabulary entries and an inner run have probability 0: over 20k draws
    none of them is drawn; tokens whose mass is tiny but positive are (their interval is not empty)."""
    probs = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.3, 1e-3, 0.2, 0.0])
    draws = 20_000
    tokens = inverse_cdf_draw(probs.repeat(draws, 1), generators(range(draws)))
    counts = torch.bincount(tokens, minlength=probs.numel())
    assert counts[probs == 0].sum() == 0, counts
    assert counts[5] > 0


def test_one_nonzero_token_at_either_edge_is_always_drawn():
    """A row whose only mass sits on the first or on the last token draws that token every time."""
    vocab = 1000
    first, last = torch.zeros(vocab), torch.zeros(vocab)
    first[0], last[-1] = 1.0, 1e-30  # unnormalised: only positivity matters
    probs = torch.stack([first, last]).repeat(500, 1)  # [1000, V]
    tokens = inverse_cdf_draw(probs, generators(range(probs.shape[0])))
    assert tokens[0::2].eq(0).all() and tokens[1::2].eq(vocab - 1).all()


def test_a_rows_token_does_not_depend_on_the_batch():
    """Rows drawn together, in reverse order, in two halves or one at a time, each with a
    generator of the same seed, get the same tokens: the draw reads only its own row's RNG."""
    torch.manual_seed(1)
    logits = torch.randn(12, 300) * 3  # [A, V]
    sampling = SamplingParams(temperature=0.9, top_k=50, top_p=0.95)
    seeds = [7 * i + 3 for i in range(12)]
    together, _ = sample_next_tokens(logits, sampling, generators(seeds))
    order = torch.randperm(12)
    permuted, _ = sample_next_tokens(logits[order], sampling, generators([seeds[i] for i in order]))
    halves = torch.cat([sample_next_tokens(logits[:5], sampling, generators(seeds[:5]))[0],
                        sample_next_tokens(logits[5:], sampling, generators(seeds[5:]))[0]])
    alone = torch.cat([sample_next_tokens(logits[i:i + 1], sampling, generators(seeds[i:i + 1]))[0]
                       for i in range(12)])
    assert torch.equal(permuted, together[order])
    assert torch.equal(halves, together) and torch.equal(alone, together)
    assert together.unique().numel() > 3  # rows of different logits do draw different tokens


def test_top_k_top_p_rows_are_drawn_from_the_renormalised_distribution():
    """After top-k = 4 and top-p = 0.85 the kept tokens' frequencies match the renormalised
    probabilities (chi-square), filtered tokens are never drawn, and the reported log-prob is the
    renormalised one of the drawn token."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    sampling = SamplingParams(temperature=1.0, top_k=4, top_p=0.85)
    # By hand: softmax of the top 4, then the nucleus keeps a token while the mass above it < 0.85.
    top4 = torch.softmax(logits[:4], dim=-1)
    kept = int((top4.cumsum(0) - top4 < 0.85).sum())
    renormalised = top4[:kept] / top4[:kept].sum()
    assert kept == 3
    draws = 20_000
    tokens, logprobs = sample_next_tokens(logits.repeat(draws, 1), sampling, generators(range(draws)))
    counts = torch.bincount(tokens, minlength=logits.numel())
    assert counts[kept:].sum() == 0, counts
    assert chi_square_p_value(counts[:kept], renormalised) > 1e-4, counts
    assert torch.allclose(logprobs, renormalised.log()[tokens], atol=1e-6)


def test_a_gemma_wide_vocabulary_keeps_its_tail():
    """262,144 tokens: one head token of mass 1/2 and a tail of 262,143 tokens of 2**-26 each,
    each below half a float32 ulp of the running sum past the head, so a float32 running sum
    stays flat over the whole tail and never draws it (torch's CPU cumsum happens to accumulate
    float32 in double; a CUDA cumsum or a float32 running sum does not). In float64 the tail keeps its mass
    (~0.39%): rows whose uniform lands past the head draw tail tokens, as the reference says."""
    vocab = 262_144
    row = torch.full((vocab,), 2.0 ** -26)
    row[0] = 0.5
    float32_running_sum = numpy.cumsum(row.numpy(), dtype=numpy.float32)  # sequential, as on a GPU
    assert (float32_running_sum == 0.5).all()  # flat: float32 loses the whole tail
    tail_share = (vocab - 1) * 2.0 ** -26 / (0.5 + (vocab - 1) * 2.0 ** -26)
    # Seeds whose uniform falls in the tail, and as many that fall on the head.
    candidates = range(20_000)
    uniforms = [torch.rand((), dtype=torch.float64, generator=g).item() for g in generators(candidates)]
    tail_seeds = [s for s, u in zip(candidates, uniforms) if u >= 1 - tail_share][:6]
    head_seeds = [s for s, u in zip(candidates, uniforms) if u < 1 - tail_share][:6]
    assert len(tail_seeds) == 6
    seeds = tail_seeds + head_seeds
    probs = row.repeat(len(seeds), 1)  # [12, V]
    got = inverse_cdf_draw(probs, generators(seeds))
    want = [reference_draw(probs[0], g) for g in generators(seeds)]
    assert got.tolist() == want
    assert (got[:6] > 0).all() and (got[6:] == 0).all()
    assert got[:6].unique().numel() == 6  # spread over the tail, not piled on its last token
