"""DAPO's parts (Yu et al. 2025, arXiv:2503.14476): the soft overlong punishment (Eq. 13), overlong
filtering (`algorithm.mask_truncated`), and dynamic sampling with refill (`rollout.dynamic_sampling`),
each checked against a float64 loop written from the paper, then in CPU runs."""

from __future__ import annotations

import pytest
import torch

import urlvr
from conftest import small_run_recipe
from urlvr.rewards.base import RewardContext, call_reward, check_reward_kwargs, REWARDS
from urlvr.rewards.length import overlong_penalty_scores
from urlvr.rollout.base import Group, Sample
from urlvr.data.records import PromptInput


def paper_overlong(length: int, l_max: int, l_cache: int) -> float:
    """DAPO Eq. 13, read off the paper."""
    if length <= l_max - l_cache:
        return 0.0
    if length <= l_max:
        return ((l_max - l_cache) - length) / l_cache
    return -1.0


def group_of(lengths, finish="eos") -> Group:
    samples = tuple(Sample(token_ids=tuple(range(n)), logprobs=(0.0,) * n, text="x" * n, finish_reason=finish)
                    for n in lengths)
    return Group(prompt=PromptInput("p", "q", (1, 2)), samples=samples)


@pytest.mark.parametrize(("l_max", "l_cache"), [(20480, 4096), (16, 4), (5, 5), (7, 1)])
def test_overlong_penalty_matches_the_paper(l_max, l_cache):
    lengths = list(range(0, l_max + 3)) if l_max < 100 else [0, 1, 16383, 16384, 16385, 18432, 20479, 20480, 20481]
    got = overlong_penalty_scores(lengths, max_length=l_max, cache=l_cache)
    for n, value in zip(lengths, got):
        assert value == pytest.approx(paper_overlong(n, l_max, l_cache), abs=1e-15), n
        assert -1.0 <= value <= 0.0
    if l_max >= 100:  # DAPO's own numbers: free up to 16384, -0.5 halfway through the cache, -1 at the cap
        assert got[lengths.index(16384)] == 0.0 and got[lengths.index(18432)] == -0.5 and got[lengths.index(20480)] == -1.0


def test_overlong_penalty_as_a_reward_term():
    spec = REWARDS.get("overlong_penalty")
    ctx = RewardContext.for_group([None] * 3, torch.ones(3, 8), extract_answer=lambda t: None)
    out = call_reward(spec, group_of([4, 7, 8]), ctx, {"max_length": 8, "cache": 4})
    assert list(out.scores) == [0.0, -0.75, -1.0]
    single = call_reward(spec, group_of([6]), RewardContext.for_group([None], torch.ones(1, 8), extract_answer=lambda t: None),
                         {"max_length": 8, "cache": 4})
    assert list(single.scores) == [-0.5]  # a group of one is scored like any other
    with pytest.raises(ValueError, match="needs max_length"):
        check_reward_kwargs("overlong_penalty", {"cache": 4})
    with pytest.raises(ValueError, match="cache must lie"):
        check_reward_kwargs("overlong_penalty", {"max_length": 8, "cache": 9})
    check_reward_kwargs("overlong_penalty", {"max_length": 8, "cache": 8})


def test_without_truncated_zeroes_exactly_the_truncated_rows():
    from urlvr.rollout.collate import collate_groups
    from urlvr.trainer.loop import _without_truncated

    groups = [group_of([3, 5], finish="eos"), group_of([5, 2], finish="length")]
    batch = collate_groups(groups, pad_token_id=0)
    masked = _without_truncated(batch, groups)
    assert masked.response_mask[:2].equal(batch.response_mask[:2])
    assert int(masked.response_mask[2:].sum()) == 0 and int(batch.response_mask[2:].sum()) == 7


def test_mask_truncated_leaves_no_gradient_when_every_response_is_cut(random_tiny_model, tmp_path):
    """Two new tokens and no stop token: every response is truncated, so nothing trains; the
    control run (same rollouts and rewards, mask off) does update."""
    base = dict(plugins=["reward_plugins"], reward={"terms": [{"name": "test_first_token"}]},
                rollout={"group_size": 4, "max_new_tokens": 2}, trainer={"total_steps": 1, "prompts_per_step": 4,
                "prompts_per_minibatch": 4, "micro_batch_size": 8, "save_every": 0, "export_final_model": False})
    masked = urlvr.train(small_run_recipe(random_tiny_model[0], tmp_path / "masked", algorithm={"mask_truncated": True}, **base))
    control = urlvr.train(small_run_recipe(random_tiny_model[0], tmp_path / "control", **base))
    m, c = masked.metrics[0], control.metrics[0]
    assert m["response/truncation_rate"] == 1.0 and m["reward/zero_variance_group_fraction"] < 1.0
    assert m["loss/policy"] == 0.0 and m["actor/grad_norm"] == 0.0
    assert c["actor/grad_norm"] > 0.0 and c["reward/proxy_mean"] == m["reward/proxy_mean"]
    assert m["perf/response_tokens"] == 4 * 4 * 2  # metrics still describe every sampled row
