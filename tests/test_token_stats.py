"""Per-token statistics vs a float64 reference, and the chunked scorer vs the model's own logits."""

import math

import pytest
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


def test_scorer_with_a_response_mask_feeds_only_real_tokens_to_the_lm_head(random_tiny_model):
    """Padding never reaches the LM head: the same values and gradients at the real tokens, 0 at
    padding, and the head sees exactly the real tokens (counted by a hook)."""
    model = random_tiny_model[1].double()  # float64: the comparison tests the selection, not float32 noise
    gen = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, 64, (3, 11), generator=gen)
    attention = torch.ones_like(input_ids)
    prompt_length = 4
    response_mask = torch.ones(3, 7, dtype=torch.long)
    response_mask[0, 5:] = 0  # right-padded responses of 5, 7 and 2 tokens
    response_mask[2, 2:] = 0
    attention[:, prompt_length:] = response_mask
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[:-1].numel()))
    try:
        results = {}
        for name, mask in (("full", None), ("masked", response_mask)):
            model.zero_grad(set_to_none=True)
            head_rows.clear()
            out = TokenScorer(model, chunk_size=2)(input_ids, attention, positions, prompt_length, 0.7, SCORE_STATS,
                                                   response_mask=mask)
            (out["logprob"] * response_mask).sum().backward()
            results[name] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                             sum(head_rows))
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
        model.float()
    (full, full_grads, full_rows), (masked, masked_grads, masked_rows) = results["full"], results["masked"]
    assert full_rows == 3 * 7 and masked_rows == int(response_mask.sum()) == 14
    for name in SCORE_STATS:
        torch.testing.assert_close(masked[name], full[name] * response_mask, atol=1e-12, rtol=1e-12)
        assert (masked[name][response_mask == 0] == 0).all()
    assert full_grads.keys() == masked_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(masked_grads[name], grad, atol=1e-12, rtol=1e-10)


def test_chunked_logprob_recomputes_the_exact_gradient_without_keeping_logits():
    """`chunked_logprob` against autograd through `log_softmax(linear(h) / T)` in float64: the same
    log-probs, detached statistics and gradients for the hidden states, weight and bias."""
    from urlvr.trainer.lm_head import chunked_logprob

    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(6, 11, bias=True).double()
    hidden = torch.randn(7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=gen)
    upstream = torch.randn(7, generator=gen, dtype=torch.float64)
    logits = head(hidden) / 0.7
    want = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    want_grads = torch.autograd.grad((want * upstream).sum(), (hidden, head.weight, head.bias))
    got = chunked_logprob(hidden, head, targets, 0.7, rows=3, detached=("entropy",))
    got_grads = torch.autograd.grad((got["logprob"] * upstream).sum(), (hidden, head.weight, head.bias))
    torch.testing.assert_close(got["logprob"], want.float(), atol=1e-6, rtol=1e-6)  # computed in float32
    torch.testing.assert_close(got["entropy"], compute_token_stats(logits.detach(), targets, ("entropy",))["entropy"].float())
    assert not got["entropy"].requires_grad
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-5)


def test_training_forward_keeps_no_logits_for_the_backward():
    """With `logprob` the only statistic that needs gradients, no `[n, V]` logits are saved for
    the backward (the head's backward recomputes them), and the gradients equal the kept-logits
    path's (which a second statistic with gradients forces), in float64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 97  # unlike any activation width of the model, so saved logits are recognisable by shape
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)).double()
    gen = torch.Generator().manual_seed(4)
    input_ids = torch.randint(3, vocab, (2, 12), generator=gen)
    attention = torch.ones_like(input_ids)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    response_mask = torch.ones(2, 7, dtype=torch.long)
    results = {}
    try:
        for name, stats in (("recomputed", ("logprob",)), ("kept", ("logprob", "entropy"))):
            saved_shapes = []
            model.zero_grad(set_to_none=True)
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_shapes.append(tuple(t.shape)) or t, lambda t: t):
                out = TokenScorer(model, chunk_size=4)(input_ids, attention, positions, 5, 0.7, stats,
                                                       detached_stats=("self_certainty",), response_mask=response_mask)
            (out["logprob"] * torch.linspace(-1, 1, 7)).sum().backward()
            results[name] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                             [shape for shape in saved_shapes if len(shape) == 2 and shape[-1] == vocab and shape[0] != vocab])
    finally:
        model.zero_grad(set_to_none=True)
    (recomputed, recomputed_grads, recomputed_logits), (kept, kept_grads, kept_logits) = results["recomputed"], results["kept"]
    assert kept_logits and not recomputed_logits, (kept_logits, recomputed_logits)
    for name in ("logprob", "self_certainty"):
        torch.testing.assert_close(recomputed[name], kept[name], atol=1e-6, rtol=1e-6)
    assert recomputed_grads.keys() == kept_grads.keys()
    for name, grad in kept_grads.items():
        torch.testing.assert_close(recomputed_grads[name], grad, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- masked vocabulary entries
def masked_reference(logits_row, target):
    """Float64, token by token: p = 0 for a -inf logit, 0 log 0 = 0, and self-certainty's uniform U
    over the entries with a finite logit (the convention in urlvr/trainer/token_stats.py)."""
    z = [float(v) for v in logits_row]
    support = [v for v in z if v != -math.inf]
    m = max(support)
    lse = m + math.log(sum(math.exp(v - m) for v in support))
    p = [math.exp(v - lse) for v in z]  # exp(-inf) = 0.0
    top = sorted(p, reverse=True)
    n = len(support)
    return {
        "logprob": z[target] - lse,
        "entropy": -sum(q * math.log(q) for q in p if q > 0),
        "self_certainty": sum((1 / n) * math.log((1 / n) / math.exp(v - lse)) for v in support),
        "top1_prob": top[0],
        "top2_prob": top[1],
    }


def masked_logits(seed: int, shape=(2, 6, 40), scale=8.0, offset=30.0):
    """bf16-rounded logits of bf16-like magnitude, with about a third of the vocabulary at -inf
    (never a whole row), as a logits mask leaves them."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=gen) * scale + offset).bfloat16().float()
    masked = torch.rand(shape, generator=gen) < 0.35
    masked[..., 0] = False
    return logits.masked_fill(masked, float("-inf"))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_token_stats_finite_with_masked_entries_at_any_temperature(temperature):
    raw = masked_logits(seed=int(temperature * 10))
    scaled = raw / temperature  # what the scorer does: -inf stays -inf
    gen = torch.Generator().manual_seed(7)
    allowed = (raw > float("-inf")).float()
    targets = torch.multinomial(allowed.flatten(0, 1), 1, generator=gen).view(raw.shape[:-1])  # never masked
    stats = compute_token_stats(scaled, targets, SCORE_STATS)  # the trainer's float32 path
    for name in SCORE_STATS:
        assert torch.isfinite(stats[name]).all(), name
    for b in range(raw.shape[0]):
        for t in range(raw.shape[1]):
            ref = masked_reference(scaled[b, t].double(), int(targets[b, t]))
            for name in SCORE_STATS:
                assert float(stats[name][b, t]) == pytest.approx(ref[name], rel=1e-4, abs=1e-4), (name, b, t)


def test_self_certainty_without_masked_entries_is_kl_from_the_full_uniform():
    logits = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(3)) * 5
    stats = compute_token_stats(logits, torch.zeros(2, 6, dtype=torch.long), ("self_certainty",))
    want = torch.logsumexp(logits.double(), -1) - logits.double().mean(-1) - math.log(40)
    torch.testing.assert_close(stats["self_certainty"].double(), want, rtol=1e-5, atol=1e-5)


def test_entropy_bonus_gradient_is_finite_with_masked_entries():
    leaf = torch.randn(3, 10, requires_grad=True)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[:, 4:] = True
    logits = leaf.masked_fill(mask, float("-inf")) / 0.7
    entropy = compute_token_stats(logits, torch.zeros(3, dtype=torch.long), ("entropy", "logprob"))["entropy"]
    entropy.sum().backward()
    assert torch.isfinite(leaf.grad).all()
    assert torch.equal(leaf.grad[:, 4:], torch.zeros(3, 6))
    want = torch.func.grad(lambda z: -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum())(leaf[:, :4].double() / 0.7) / 0.7
    torch.testing.assert_close(leaf.grad[:, :4].double(), want, rtol=1e-5, atol=1e-6)


def test_lowest_bf16_logit_as_mask_stays_finite():
    """Some code masks with finfo(bf16).min instead of -inf; divided by T < 1 that overflows to -inf
    in float32, and the sum over the vocabulary must not overflow either."""
    logits = torch.randn(2, 16)
    logits[:, 8:] = torch.finfo(torch.bfloat16).min
    for temperature in (1.0, 0.7):
        stats = compute_token_stats(logits / temperature, torch.zeros(2, dtype=torch.long), SCORE_STATS)
        for name in SCORE_STATS:
            assert torch.isfinite(stats[name]).all(), (name, temperature)


def test_chunked_scorer_with_a_masked_vocabulary_matches_the_reference():
    """The actor's chunked pass (lm_head per chunk, then / T) on a model whose head masks half the vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()

    class MaskedHead(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, hidden):
            logits = self.head(hidden)
            return logits.masked_fill(torch.arange(logits.shape[-1]) % 2 == 1, float("-inf"))

    model.lm_head = MaskedHead(model.lm_head)
    model.get_output_embeddings = lambda: model.lm_head
    input_ids = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(2)) * 2  # even ids only
    attention = torch.ones_like(input_ids)
    positions = attention.cumsum(-1) - 1
    prompt_length, temperature = 4, 0.7
    with torch.no_grad():
        stats = TokenScorer(model, chunk_size=2)(input_ids, attention, positions, prompt_length, temperature, SCORE_STATS)
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits
    scaled = logits[:, prompt_length - 1 : -1].double() / temperature
    for b in range(2):
        for t in range(scaled.shape[1]):
            ref = masked_reference(scaled[b, t], int(input_ids[b, prompt_length + t]))
            for name in SCORE_STATS:
                assert float(stats[name][b, t]) == pytest.approx(ref[name], rel=1e-4, abs=1e-5), (name, b, t)


def test_scorer_soft_caps_logits_as_gemma2s_own_forward():
    """Gemma 2 caps its logits (cap * tanh(z / cap)) inside its forward; the scorer calls the decoder
    and the head itself, so it must cap too, in the scoring and the training (gradient) paths."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from urlvr.trainer.actor import TokenScorer

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5,
                          initializer_range=0.5)
    model = Gemma2ForCausalLM(config).double().eval()
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones_like(ids)
    positions = torch.arange(7).expand(2, 7)
    reference = model(input_ids=ids, attention_mask=mask).logits[:, 2:-1].log_softmax(-1)
    reference = reference.gather(-1, ids[:, 3:, None])[..., 0]  # [2, 4]
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = TokenScorer(model)(input_ids=ids, attention_mask=mask, position_ids=positions, prompt_length=3,
                                     temperature=1.0, stats=("logprob",))["logprob"]
        torch.testing.assert_close(got.detach().double(), reference.detach(), atol=1e-5, rtol=0)


def test_scorer_refuses_a_model_that_rescales_its_logits(random_tiny_model):
    from urlvr.trainer.actor import TokenScorer

    _, model, _ = random_tiny_model
    model.config.logit_scale = 0.0625
    try:
        with pytest.raises(ValueError, match="logit_scale=0.0625"):
            TokenScorer(model)
    finally:
        del model.config.logit_scale
