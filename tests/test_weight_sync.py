"""Weight sync to a rollout engine with its own copy (vLLM): buckets, names, copies; the
sampler/trainer mismatch metrics and truncated importance sampling. No vLLM needed here
(tests/test_vllm.py runs the engine itself)."""

from __future__ import annotations

import math
import pytest
import torch

from urlvr.rollout.weight_sync import iter_weights, parameter_buckets
from urlvr.algorithms.mismatch import TokenTIS
from urlvr.metrics.dynamics import sampler_mismatch_metrics
from urlvr.algorithms.losses import truncated_importance_weights


class Tied(torch.nn.Module):
    """embed (40x8) -> proj (8x8) -> head tied to embed: the shape of a tied LM."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(40, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 40, bias=False)
        self.head.weight = self.embed.weight


def test_buckets_are_bounded_and_cover_every_name_once():
    model = Tied()
    bucket_bytes = 40 * 8 * 4 + 8 * 4  # embed + a bias: proj.weight starts a new bucket, the tied
    # head (embed again, 1280 bytes) does not fit beside proj and goes alone
    buckets = parameter_buckets(model, bucket_bytes)
    names = [name for bucket in buckets for name, _ in bucket]
    assert names == [name for name, _ in model.named_parameters(remove_duplicate=False)]
    assert "head.weight" in names and "embed.weight" in names  # a tied weight goes under both names
    for bucket in buckets:
        unique = {id(p): p for _, p in bucket}.values()
        assert sum(p.numel() * p.element_size() for p in unique) <= bucket_bytes or len(unique) == 1
    assert [[n for n, _ in b] for b in buckets] == [["embed.weight"], ["proj.weight", "proj.bias"], ["head.weight"]]


def test_one_huge_bucket_and_one_byte_buckets():
    model = Tied()
    assert len(parameter_buckets(model, 2**30)) == 1
    assert [len(b) for b in parameter_buckets(model, 1)] == [1, 1, 1, 1]  # every name alone
    with pytest.raises(ValueError, match="bucket_bytes"):
        parameter_buckets(model, 0)


def test_iter_weights_yields_independent_copies_in_the_asked_dtype():
    model = Tied()
    weights = dict(iter_weights(model, bucket_bytes=64, dtype=torch.bfloat16))
    assert set(weights) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert weights[name].dtype == torch.bfloat16
        assert torch.equal(weights[name], tensor.to(torch.bfloat16))
        assert weights[name].data_ptr() != tensor.data_ptr()
    with torch.no_grad():
        model.proj.weight.add_(1.0)
    assert not torch.equal(weights["proj.weight"], model.proj.weight.to(torch.bfloat16))  # a copy, not a view


def test_truncated_importance_weights_against_a_float64_loop():
    torch.manual_seed(0)
    trainer = -torch.rand(3, 5, dtype=torch.float64) * 3
    sampler = trainer + torch.randn(3, 5, dtype=torch.float64) * 0.7
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    cap = 1.5
    got = truncated_importance_weights(trainer, sampler, mask, cap)
    for i in range(3):
        for t in range(5):
            want = min(math.exp(float(trainer[i, t]) - float(sampler[i, t])), cap) if mask[i, t] else 1.0
            assert float(got[i, t]) == pytest.approx(want, rel=1e-12)
    assert (got <= cap).all() and not got.requires_grad


def test_mismatch_metrics_against_hand_computed_values():
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -9.0]])
    sampler = torch.tensor([[-1.2, -2.0, -0.1], [-0.1, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the last token is padding: ignored
    diffs = [0.2, 0.0, -0.4, 0.0, -1.0]  # trainer - sampler on the 5 real tokens
    out = sampler_mismatch_metrics(trainer, sampler, mask)
    assert out["rollout/logprob_mismatch_mean"] == pytest.approx(sum(abs(d) for d in diffs) / 5, rel=1e-6)
    k3 = [math.expm1(d) - d for d in diffs]  # KL(sampler || trainer), samples from the sampler
    assert out["rollout/mismatch_kl"] == pytest.approx(sum(k3) / 5, rel=1e-6)
    assert "rollout/tis_weight_mean" not in out  # logged by algorithm.mismatch: token_tis (tests/test_mismatch.py)
    tis = TokenTIS(cap=1.1).weights(trainer, sampler, mask).token_means
    assert tis["rollout/tis_weight_mean"] == pytest.approx(sum(min(math.exp(d), 1.1) for d in diffs) / 5, rel=1e-6)
    assert tis["rollout/tis_truncated_fraction"] == pytest.approx(1 / 5)  # only exp(0.2) > 1.1


def test_vllm_engine_without_vllm_is_a_one_line_error(tmp_path, capsys):
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    from urlvr.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: %s\nrollout: {engine: vllm, max_new_tokens: 8}\n"
                      "trainer: {total_steps: 1, prompts_per_step: 2, prompts_per_minibatch: 2}\n" % (tmp_path / "run"))
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("urlvr: error: rollout.engine: the `vllm` rollout engine needs vLLM"), err
