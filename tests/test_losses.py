"""Policy loss, KL estimators, entropy and loss aggregation against plain-Python float64
references (loops over lists, never the functions under test) and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from urlvr.registry import UnknownNameError
from urlvr.algorithms.losses import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    token_weights,
)
from urlvr.algorithms.token_stats import compute_token_stats
from urlvr.algorithms.policy_losses import POLICY_LOSSES, PolicyLossOutput, policy_loss_metrics, ppo_clip_loss

F64 = torch.float64


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """The trainer's entropy statistic as the scorer computes it (logits upcast to at least float32)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return compute_token_stats(z, torch.zeros(z.shape[:-1], dtype=torch.long), ("entropy",))["entropy"]


# the trainer's reduction, Σ token_weights · per-token loss (loop.py), as a function for the tests
def aggregate_loss(
    per_token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str,
    *,
    max_response_length: int,
    num_sequences: int | None = None,
    num_tokens: int | None = None,
) -> torch.Tensor:
    """loss = Σ_it w_it · ℓ_it with w = token_weights(mask, mode, ...); masked NaN/inf ignored."""
    weights = token_weights(
        response_mask,
        mode,
        max_response_length=max_response_length,
        num_sequences=num_sequences,
        num_tokens=num_tokens,
        dtype=per_token_loss.dtype,
    )  # [B, T]
    losses = per_token_loss.masked_fill(response_mask == 0, 0.0)  # [B, T]
    return (weights * losses).sum()

CLIP = {"clip_eps_low": 0.2, "clip_eps_high": 0.28}  # DAPO clip-higher
MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


# --------------------------------------------------------------------------- inputs
def ragged_batch(seed: int, batch: int = 6, length: int = 9) -> dict[str, torch.Tensor]:
    """float64 log-probs whose ratios straddle both clip edges, a ragged mask with an empty row."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen, dtype=F64) * 3
    logprobs = old + torch.randn(batch, length, generator=gen, dtype=F64) * 0.8
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    lengths[seed % batch] = 0  # one fully masked response
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    signs = torch.tensor([1.0, -1.0], dtype=F64).repeat(batch // 2 + 1)[:batch]
    advantages = torch.randn(batch, generator=gen, dtype=F64).abs() * signs  # both signs present
    advantages[(seed + 1) % batch] = 0.0
    return {"logprobs": logprobs, "old": old, "mask": mask, "advantages": advantages}


# --------------------------------------------------------------------------- references
def reference_ppo(logprobs, old, advantages, mask, lo, hi, c):
    """Paper form: surr = min(r·A, clip(r)·A); for A<0 with dual clip surr = max(surr, c·A); loss = -surr."""
    loss, ratio, clipped, dual = [], [], [], []
    for i, row in enumerate(logprobs):
        lrow, rrow, crow, drow = [], [], [], []
        for t, lp in enumerate(row):
            adv = advantages[i][t] if isinstance(advantages[i], list) else advantages[i]
            if not mask[i][t]:
                lrow.append(0.0), rrow.append(1.0), crow.append(False), drow.append(False)
                continue
            r = math.exp(min(20.0, max(-20.0, lp - old[i][t])))
            r_clip = min(max(r, 1.0 - lo), 1.0 + hi)
            surr = min(r * adv, r_clip * adv)
            was_clipped = r_clip * adv < r * adv
            was_dual = False
            if c is not None and adv < 0:
                was_dual = surr < c * adv
                surr = max(surr, c * adv)
            lrow.append(-surr), rrow.append(r), crow.append(was_clipped), drow.append(was_dual)
        loss.append(lrow), ratio.append(rrow), clipped.append(crow), dual.append(drow)
    return loss, ratio, clipped, dual


def reference_kl(name: str, lp: float, ref: float) -> float:
    if name == "k1":
        return lp - ref
    if name == "k2":
        return 0.5 * (lp - ref) ** 2
    return math.exp(ref - lp) - (ref - lp) - 1.0


def reference_entropy(row: list[float]) -> float:
    finite = [z for z in row if z != -math.inf]
    top = max(finite)
    lse = top + math.log(sum(math.exp(z - top) for z in finite))
    return -sum(math.exp(z - lse) * (z - lse) for z in finite)


def reference_aggregate(losses, mask, mode: str, max_len: int) -> float:
    rows = len(losses)
    if mode == "token-mean":
        num = sum(l for lr, mr in zip(losses, mask) for l, m in zip(lr, mr) if m)
        den = sum(m for mr in mask for m in mr)
        return num / den if den else 0.0
    total = 0.0
    for lr, mr in zip(losses, mask):
        seq_sum = sum(l for l, m in zip(lr, mr) if m)
        seq_len = sum(mr)
        if mode == "seq-mean-token-mean":
            total += seq_sum / seq_len if seq_len else 0.0
        else:
            total += seq_sum / max_len
    return total / rows


# --------------------------------------------------------------------------- ppo_clip vs reference
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("dual_clip_c", [None, 3.0, 1.5])
@pytest.mark.parametrize("per_token_advantages", [False, True])
def test_ppo_clip_matches_float64_reference(seed: int, dual_clip_c: float | None, per_token_advantages: bool) -> None:
    b = ragged_batch(seed)
    adv = b["advantages"]
    if per_token_advantages:
        spread = torch.rand(b["mask"].shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
        adv = adv.unsqueeze(1) * (1 + spread)
    out = ppo_clip_loss(b["logprobs"], b["old"], adv, b["mask"], **CLIP, dual_clip_c=dual_clip_c)
    loss, ratio, clipped, dual = reference_ppo(
        b["logprobs"].tolist(), b["old"].tolist(), adv.tolist(), b["mask"].tolist(), 0.2, 0.28, dual_clip_c
    )
    torch.testing.assert_close(out.per_token_loss, torch.tensor(loss, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.ratio, torch.tensor(ratio, dtype=F64), rtol=1e-12, atol=0)
    assert torch.equal(out.clipped, torch.tensor(clipped))
    assert torch.equal(out.dual_clipped, torch.tensor(dual))
    # the random batch really exercises the branches it claims to
    assert out.clipped.any()
    if dual_clip_c == 1.5:
        assert out.dual_clipped.any()


# --------------------------------------------------------------------------- ppo_clip by hand
def one_token(ratio: float, adv: float, **kw) -> PolicyLossOutput:
    kw = CLIP | kw
    logprobs = torch.tensor([[math.log(ratio)]], dtype=F64)
    return ppo_clip_loss(logprobs, torch.zeros(1, 1, dtype=F64), torch.tensor([adv], dtype=F64), torch.ones(1, 1), **kw)


@pytest.mark.parametrize(
    ("ratio", "adv", "dual_clip_c", "loss", "clipped", "dual_clipped"),
    [
        (1.5, 1.0, None, -1.28, True, False),  # A > 0, above 1 + eps_high: clipped at 1.28
        (1.2, 1.0, None, -1.2, False, False),  # inside (1 - 0.2, 1 + 0.28): untouched
        (0.5, 1.0, None, -0.5, False, False),  # A > 0, ratio low: min keeps the smaller r·A
        (0.5, -1.0, None, 0.8, True, False),  # A < 0, below 1 - eps_low: clipped at 0.8
        (5.0, -1.0, None, 5.0, False, False),  # A < 0, huge ratio, no dual clip: unbounded
        (5.0, -1.0, 3.0, 3.0, False, True),  # dual clip caps the loss at -c·A = 3
        (2.0, -1.0, 3.0, 2.0, False, False),  # below the cap: untouched
        (5.0, -2.0, 3.0, 6.0, False, True),  # cap scales with |A|
        (5.0, 1.0, 3.0, -1.28, True, False),  # dual clip never touches A > 0
    ],
)
def test_ppo_clip_hand_computed(ratio, adv, dual_clip_c, loss, clipped, dual_clipped) -> None:
    out = one_token(ratio, adv, dual_clip_c=dual_clip_c)
    assert out.per_token_loss.item() == pytest.approx(loss, rel=1e-12)
    assert out.ratio.item() == pytest.approx(ratio, rel=1e-12)
    assert out.clipped.item() is clipped
    assert out.dual_clipped.item() is dual_clipped


def test_dual_clip_flag_is_strict_at_the_bound() -> None:
    # loss exactly -c·A: the cap changes nothing, so it is not counted as active (verl's torch.gt)
    at_bound = one_token(2.0, -1.0, dual_clip_c=2.0)
    assert at_bound.ratio.item() == 2.0  # exp(log 2) is exact in float64
    assert at_bound.per_token_loss.item() == 2.0 and not at_bound.dual_clipped.item()
    assert one_token(2.5, -1.0, dual_clip_c=2.0).dual_clipped.item()


def test_ppo_clip_asymmetric_eps_is_used() -> None:
    # 1.25 is clipped with a symmetric 0.2, not with DAPO's clip-higher 0.28
    assert one_token(1.25, 1.0, clip_eps_low=0.2, clip_eps_high=0.2).clipped.item()
    assert not one_token(1.25, 1.0, clip_eps_low=0.2, clip_eps_high=0.28).clipped.item()


@pytest.mark.parametrize("dual_clip_c", [None, 3.0])
def test_on_policy_ratio_is_exactly_one_and_loss_is_minus_advantage(dual_clip_c: float | None) -> None:
    b = ragged_batch(7)
    out = ppo_clip_loss(b["old"].clone(), b["old"], b["advantages"], b["mask"], **CLIP, dual_clip_c=dual_clip_c)
    assert torch.equal(out.ratio, torch.ones_like(out.ratio))
    mask = b["mask"].bool()
    minus_adv = (-b["advantages"]).unsqueeze(1).expand_as(out.per_token_loss)
    assert torch.equal(out.per_token_loss[mask], minus_adv[mask])
    assert torch.equal(out.per_token_loss[~mask], torch.zeros(int((~mask).sum()), dtype=F64))
    assert not out.clipped.any() and not out.dual_clipped.any()


def test_gradient_is_zero_exactly_where_clipped() -> None:
    b = ragged_batch(2)
    logprobs = b["logprobs"].clone().requires_grad_(True)
    out = ppo_clip_loss(logprobs, b["old"], b["advantages"], b["mask"], **CLIP, dual_clip_c=1.5)
    out.per_token_loss.sum().backward()
    # d(-A·r)/d(log pi) = -A·r on live tokens; 0 on clipped, dual-clipped and padded ones
    adv = b["advantages"].unsqueeze(1).expand_as(logprobs)
    live = b["mask"].bool() & ~out.clipped & ~out.dual_clipped
    expected = torch.where(live, -adv * out.ratio.detach(), torch.zeros((), dtype=F64))
    torch.testing.assert_close(logprobs.grad, expected, rtol=1e-12, atol=1e-15)
    assert (logprobs.grad[out.clipped] == 0).all() and out.clipped.any()


def test_padding_garbage_reaches_neither_loss_nor_gradient() -> None:
    logprobs = torch.tensor([[-1.0, float("nan"), float("inf")]], dtype=F64, requires_grad=True)
    old = torch.tensor([[-1.2, float("-inf"), float("nan")]], dtype=F64)
    mask = torch.tensor([[1, 0, 0]])
    out = ppo_clip_loss(logprobs, old, torch.tensor([1.0], dtype=F64), mask, **CLIP, dual_clip_c=3.0)
    assert torch.equal(out.per_token_loss[0, 1:], torch.zeros(2, dtype=F64))
    aggregate_loss(out.per_token_loss, mask, "token-mean", max_response_length=3).backward()
    assert torch.isfinite(logprobs.grad).all() and torch.equal(logprobs.grad[0, 1:], torch.zeros(2, dtype=F64))


def test_dual_clip_c_must_exceed_one() -> None:
    with pytest.raises(ValueError, match="dual_clip_c must be > 1"):
        one_token(1.0, 1.0, dual_clip_c=1.0)


def test_policy_loss_metrics_hand_computed() -> None:
    # token ratios 1.5 (A=+1, clipped), 5.0 (A=-1, dual-clipped), 1.0, 1.0, and one padded token
    logprobs = torch.log(torch.tensor([[1.5, 5.0, 1.0], [1.0, 9.0, 9.0]], dtype=F64))
    adv = torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = ppo_clip_loss(logprobs, torch.zeros(2, 3, dtype=F64), adv, mask, **CLIP, dual_clip_c=3.0)
    metrics = policy_loss_metrics(out, mask)
    assert metrics["clip_fraction"] == 0.25
    assert metrics["dual_clip_fraction"] == 0.25
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 5.0 + 1.0 + 1.0) / 4, rel=1e-12)
    assert metrics["ratio_max"] == pytest.approx(5.0, rel=1e-12)
    assert metrics["ratio_min"] == pytest.approx(1.0, rel=1e-12)
    empty = policy_loss_metrics(out, torch.zeros(2, 3))
    assert empty["clip_fraction"] == 0.0 and math.isnan(empty["ratio_mean"])


# --------------------------------------------------------------------------- KL
@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_matches_float64_reference(name: str, seed: int) -> None:
    b = ragged_batch(seed)
    got = KL_ESTIMATORS.get(name)(b["logprobs"], b["old"])
    want = [
        [reference_kl(name, lp, ref) for lp, ref in zip(lp_row, ref_row)]
        for lp_row, ref_row in zip(b["logprobs"].tolist(), b["old"].tolist())
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-12, atol=1e-14)


def test_kl_hand_computed() -> None:
    lp, ref = torch.tensor([[math.log(0.5)]], dtype=F64), torch.tensor([[math.log(0.25)]], dtype=F64)
    log2 = math.log(2)
    assert KL_ESTIMATORS.get("k1")(lp, ref).item() == pytest.approx(log2, rel=1e-14)
    assert KL_ESTIMATORS.get("k2")(lp, ref).item() == pytest.approx(0.5 * log2**2, rel=1e-14)
    assert KL_ESTIMATORS.get("k3")(lp, ref).item() == pytest.approx(0.5 + log2 - 1, rel=1e-14)  # r=1/2: r - log r - 1


@pytest.mark.parametrize("name", ["k1", "k3"])
def test_k1_k3_expectation_under_pi_is_exact_kl(name: str) -> None:
    # E_{y~pi}[k(y)] = KL(pi || pi_ref) exactly for the unbiased estimators
    gen = torch.Generator().manual_seed(0)
    log_pi = torch.log_softmax(torch.randn(1, 7, generator=gen, dtype=F64), dim=-1)
    log_ref = torch.log_softmax(torch.randn(1, 7, generator=gen, dtype=F64), dim=-1)
    pi = log_pi.exp().tolist()[0]
    true_kl = sum(p * (a - b) for p, a, b in zip(pi, log_pi.tolist()[0], log_ref.tolist()[0]))
    expectation = (log_pi.exp() * KL_ESTIMATORS.get(name)(log_pi, log_ref)).sum().item()
    assert expectation == pytest.approx(true_kl, rel=1e-12)
    assert true_kl > 0.05


def test_k2_k3_nonnegative_and_zero_on_equal() -> None:
    b = ragged_batch(4)
    for name in ["k2", "k3"]:
        assert (KL_ESTIMATORS.get(name)(b["logprobs"], b["old"]) >= 0).all()
    for name in ["k1", "k2", "k3"]:
        assert torch.equal(KL_ESTIMATORS.get(name)(b["old"], b["old"]), torch.zeros_like(b["old"]))


# --------------------------------------------------------------------------- entropy
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(2, 4, 11))
    want = torch.tensor([[reference_entropy(list(row)) for row in batch] for batch in logits.tolist()], dtype=F64)
    got64 = entropy_from_logits(torch.from_numpy(logits))
    assert got64.shape == (2, 4) and got64.dtype == F64
    torch.testing.assert_close(got64, want, rtol=1e-12, atol=1e-12)
    got32 = entropy_from_logits(torch.from_numpy(logits).float())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)


def test_entropy_bf16_is_computed_in_float32() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)).bfloat16()
    got = entropy_from_logits(logits)
    assert got.dtype == torch.float32
    want = torch.tensor([reference_entropy(row) for row in logits.double().tolist()], dtype=F64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_entropy_hand_computed_and_stable() -> None:
    vocab = 16
    assert entropy_from_logits(torch.zeros(vocab, dtype=F64)).item() == pytest.approx(math.log(vocab), rel=1e-14)
    # huge logits: naive exp() overflows; logsumexp does not
    big = torch.tensor([1e4, 1e4, -1e4], dtype=torch.float32)
    assert entropy_from_logits(big).item() == pytest.approx(math.log(2), rel=1e-6)
    # -inf logits (banned tokens) are probability 0: no NaN, entropy of the rest
    banned = torch.tensor([0.0, 0.0, -math.inf, -math.inf])
    assert entropy_from_logits(banned).item() == pytest.approx(math.log(2), rel=1e-6)
    assert entropy_from_logits(torch.tensor([0.0, -1e4, -1e4])).item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_gradient_is_finite_with_masked_entries() -> None:
    leaf = torch.randn(2, 6, generator=torch.Generator().manual_seed(0), dtype=F64, requires_grad=True)
    masked = torch.arange(6) >= 3
    entropy_from_logits(leaf.masked_fill(masked, -math.inf)).sum().backward()
    want = torch.func.grad(lambda z: entropy_from_logits(z).sum())(leaf[:, :3].detach())
    torch.testing.assert_close(leaf.grad, torch.cat([want, torch.zeros(2, 3, dtype=F64)], dim=1))


# --------------------------------------------------------------------------- aggregation
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_aggregation_matches_float64_reference(mode: str, seed: int) -> None:
    b = ragged_batch(seed)
    losses = torch.randn(b["mask"].shape, generator=torch.Generator().manual_seed(100 + seed), dtype=F64)
    got = aggregate_loss(losses, b["mask"], mode, max_response_length=12)
    want = reference_aggregate(losses.tolist(), b["mask"].tolist(), mode, 12)
    assert got.dtype == F64
    assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_aggregation_hand_computed() -> None:
    losses = torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    def agg(mode: str) -> float:
        return aggregate_loss(losses, mask, mode, max_response_length=4).item()

    assert agg("token-mean") == pytest.approx(2.0)  # 6 / 3
    assert agg("seq-mean-token-mean") == pytest.approx(2.25)  # (1.5 + 3) / 2
    assert agg("seq-mean-token-sum-norm") == pytest.approx(0.75)  # (3/4 + 3/4) / 2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("seed", "splits"), [(0, [2, 4]), (1, [1, 2, 3]), (2, [3, 3]), (3, [4, 1, 1])])
def test_micro_batches_with_global_counts_sum_to_full_batch(mode: str, seed: int, splits: list[int]) -> None:
    b = ragged_batch(seed)
    mask = b["mask"]
    losses = torch.randn(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    full = aggregate_loss(losses, mask, mode, max_response_length=12)
    counts = {"num_sequences": mask.shape[0], "num_tokens": int(mask.sum())}
    micro = list(zip(losses.split(splits), mask.split(splits)))
    summed = sum(aggregate_loss(l, m, mode, max_response_length=12, **counts) for l, m in micro)
    assert abs(summed.item() - full.item()) <= 1e-12
    # and the global counts matter: local ones give a different (wrong) total on ragged batches
    local = sum(aggregate_loss(l, m, mode, max_response_length=12) for l, m in micro)
    assert abs(local.item() - full.item()) > 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_fully_masked_rows_and_batches_give_no_nan(mode: str) -> None:
    losses = torch.randn(3, 4, dtype=F64)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    weights = token_weights(mask, mode, max_response_length=4)
    assert torch.isfinite(weights).all() and torch.equal(weights[1], torch.zeros(4))
    assert torch.isfinite(aggregate_loss(losses, mask, mode, max_response_length=4))
    empty = aggregate_loss(losses, torch.zeros(3, 4), mode, max_response_length=4)
    assert empty.item() == 0.0


def test_token_weights_totals() -> None:
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]])
    def total(mode: str) -> float:
        return token_weights(mask, mode, max_response_length=3).sum().item()

    assert total("token-mean") == pytest.approx(1.0)
    assert total("seq-mean-token-mean") == pytest.approx(3 / 4)  # each non-empty row 1/N, the empty one 0
    assert total("seq-mean-token-sum-norm") == pytest.approx(6 / (3 * 4))
    assert token_weights(mask, "token-mean", max_response_length=3).dtype == torch.float32
    assert token_weights(mask.double(), "token-mean", max_response_length=3).dtype == F64


def test_aggregation_rejects_bad_arguments() -> None:
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match="max_response_length"):
        token_weights(mask, "token-mean", max_response_length=0)
    with pytest.raises(UnknownNameError, match="did you mean 'token-mean'"):
        token_weights(mask, "token_mean", max_response_length=3)


# --------------------------------------------------------------------------- registries
def test_registered_names() -> None:
    import urlvr.builtins  # noqa: F401  (GSPO and CISPO register in their own modules)

    builtin = [n for n in POLICY_LOSSES.names() if POLICY_LOSSES.get(n).__module__.startswith("urlvr.")]  # not plugins
    assert builtin == ["cispo", "gspo", "gspo_token", "ppo_clip"]
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    assert LOSS_AGGREGATIONS.names() == sorted(MODES)


@pytest.mark.parametrize(
    ("registry", "taken", "typo", "suggestion"),
    [
        (POLICY_LOSSES, "ppo_clip", "ppo-clip", "ppo_clip"),
        (KL_ESTIMATORS, "k3", "k33", "k3"),
        (LOSS_AGGREGATIONS, "seq-mean-token-sum-norm", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
    ],
)
def test_registries_refuse_duplicates_and_suggest(registry, taken: str, typo: str, suggestion: str) -> None:
    before = registry.get(taken)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(taken)(lambda *a, **kw: None)
    assert registry.get(taken) is before
    with pytest.raises(UnknownNameError, match=f"did you mean '{suggestion}'"):
        registry.get(typo)


# --------------------------------------------------------------------------- KL estimators as loss terms
def _expected_kl_gradient(estimator, logits, ref_logits) -> list[float]:
    """E_{y~π}[∇_z k(log π(y), log π_ref(y))] with π's sampling weights held fixed (as sampling
    does), by enumerating the vocabulary: the exact expected gradient of the loss term."""
    z = torch.tensor(logits, dtype=F64, requires_grad=True)
    logp, ref = torch.log_softmax(z, -1), torch.log_softmax(torch.tensor(ref_logits, dtype=F64), -1)
    weights = logp.detach().exp()
    (weights * estimator(logp, ref)).sum().backward()
    return z.grad.tolist()


def _analytic_kl_gradients(logits, ref_logits) -> tuple[list[float], list[float]]:
    """(∇_z KL(π‖π_ref), ∇_z KL(π_ref‖π)) in plain float64 Python from the softmax Jacobian."""
    def softmax(v):
        m = max(v)
        e = [math.exp(x - m) for x in v]
        return [x / sum(e) for x in e]
    p, q = softmax(logits), softmax(ref_logits)
    log_ratio = [math.log(a / b) for a, b in zip(p, q)]
    mean = sum(a * r for a, r in zip(p, log_ratio))
    reverse = [p[j] * (log_ratio[j] - mean) for j in range(len(p))]  # ∂/∂z_j Σ p log(p/q)
    forward = [p[j] - q[j] for j in range(len(p))]  # ∂/∂z_j Σ q log(q/p)
    return reverse, forward


def test_kl_estimators_gradients_as_loss_terms() -> None:
    logits, ref_logits = [1.0, -0.5, 0.2, 0.7], [0.1, 0.3, 0.9, -0.4]
    reverse, forward = _analytic_kl_gradients(logits, ref_logits)
    assert _expected_kl_gradient(KL_ESTIMATORS.get("k2"), logits, ref_logits) == pytest.approx(reverse, abs=1e-12)
    assert _expected_kl_gradient(KL_ESTIMATORS.get("k3"), logits, ref_logits) == pytest.approx(forward, abs=1e-12)
    assert _expected_kl_gradient(KL_ESTIMATORS.get("k1"), logits, ref_logits) == pytest.approx([0.0] * 4, abs=1e-12)
    assert max(abs(g) for g in reverse) > 0.1  # the toy's KL gradient is far from zero
    assert KL_ESTIMATORS.get("k1").loss_gradient is None
