"""Per-token statistics vs a float64 reference, and the chunked scorer vs the model's own logits."""

import math

import torch

from urlvr.algorithms.token_stats import BUILTIN_TOKEN_STATS as SCORE_STATS
from urlvr.trainer.actor import TokenScorer
from urlvr.algorithms.token_stats import compute_token_stats


def reference_stats(logits_row, target):
    z = [float(v) for v in logits_row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    p = [math.exp(v - lse) for v in z]
    top = sorted(p, reverse=True)
    return {
        "logprob": z[target] - lse,
        "entropy": -sum(q * math.log(q) for q in p if q > 0),
        "self_certainty": sum((1 / len(z)) * math.log((1 / len(z)) / q) for q in p),  # KL(U || pi)
        "top1_prob": top[0],
        "top2_prob": top[1],
    }


def test_token_stats_match_float64_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, 11, (3, 5), generator=gen)
    stats = compute_token_stats(logits, targets, SCORE_STATS)
    for b in range(3):
        for t in range(5):
            ref = reference_stats(logits[b, t], int(targets[b, t]))
            for name in SCORE_STATS:
                assert abs(float(stats[name][b, t]) - ref[name]) < 1e-12, name


def test_chunked_scorer_equals_full_logits(random_tiny_model):
    _, model, tokenizer = random_tiny_model
    scorer = TokenScorer(model, chunk_size=3)  # several chunks over a 7-token response
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 64, (2, 12), generator=gen)
    attention = torch.ones_like(input_ids)
    attention[1, :2] = 0  # left padding on the second row
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    prompt_length, temperature = 5, 0.7
    with torch.no_grad():
        stats = scorer(input_ids, attention, positions, prompt_length, temperature, SCORE_STATS)
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits.double()
    full = logits[:, prompt_length - 1 : -1] / temperature
    expected = compute_token_stats(full, input_ids[:, prompt_length:], SCORE_STATS)
    for name in SCORE_STATS:
        torch.testing.assert_close(stats[name].double(), expected[name], atol=1e-5, rtol=1e-5)
