"""Who holds which rows (urlvr/trainer/sharding.py): whole prompts per rank for rollout, an even
share of every mini-batch's rows for the update, the same number of calls on every rank.
The multi-process runs are in test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from urlvr.dist import DistInfo, even_shard
from urlvr.rollout.base import RolloutBatch
from urlvr.trainer.settings import RunSettings
from urlvr.trainer.sharding import RowLayout

from conftest import small_run_recipe


def test_even_shard_splits_thirty_prompts_over_eight_ranks():
    shards = [even_shard(30, 8, rank) for rank in range(8)]
    assert [len(s) for s in shards] == [4, 4, 4, 4, 4, 4, 3, 3]
    assert [i for s in shards for i in s] == list(range(30))  # contiguous, in rank order
    assert [len(even_shard(1, 8, rank)) for rank in range(8)] == [1, 0, 0, 0, 0, 0, 0, 0]


def layouts(rows: int, rows_per_minibatch: int, micro_batch_size: int, world: int) -> list[RowLayout]:
    return [RowLayout(rows, rows_per_minibatch, micro_batch_size, world, rank) for rank in range(world)]


@pytest.mark.parametrize(("prompts", "per_minibatch", "group_size", "micro", "world"),
                         [(30, 30, 32, 4, 8), (30, 1, 32, 4, 8), (3, 1, 3, 1, 2), (16, 1, 4, 1, 8), (6, 2, 8, 5, 1)])
def test_every_row_is_trained_once_with_equal_call_counts(prompts, per_minibatch, group_size, micro, world):
    ranks = layouts(prompts * group_size, per_minibatch * group_size, micro, world)
    calls = ranks[0].micro_steps_per_minibatch
    for start in range(0, prompts * group_size, per_minibatch * group_size):
        shares = [layout.minibatch_rows(start) for layout in ranks]
        assert [row for share in shares for row in share] == list(range(start, start + per_minibatch * group_size))
        assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1
        assert all(-(-len(s) // micro) <= calls for s in shares)  # nobody needs more calls than planned
    scored = sorted(row for layout in ranks for run in layout.scored_rows() for row in run)
    assert scored == list(range(prompts * group_size))  # each row scored by exactly one rank
    assert all(layout.score_calls == ranks[0].score_calls for layout in ranks)


def test_a_world_of_one_scores_the_batch_as_one_run():
    layout = RowLayout(rows=48, rows_per_minibatch=16, micro_batch_size=5, world_size=1, rank=0)
    assert layout.scored_rows() == [range(0, 48)]  # chunked across mini-batches, exactly as before sharding
    assert layout.score_calls == 10 and layout.micro_steps_per_minibatch == 4


def test_fillers_pad_a_rank_to_the_planned_calls():
    batch = RolloutBatch(input_ids=torch.arange(12).view(3, 4), attention_mask=torch.ones(3, 4, dtype=torch.long),
                         response_mask=torch.ones(3, 2, dtype=torch.long), sampler_logprobs=torch.zeros(3, 2),
                         prompt_length=2, group_size=3)
    short = RowLayout(rows=3, rows_per_minibatch=3, micro_batch_size=1, world_size=2, rank=1)  # 1 row of 3
    out = list(short.micro_batches(batch, [short.minibatch_rows(0)], short.micro_steps_per_minibatch,
                                   {"advantages": torch.tensor([1.0, 2.0, 3.0])}))
    assert [real for _, real in out] == [True, False]
    assert out[0][0]["advantages"].tolist() == [3.0] and out[1][0]["input_ids"].shape == (1, 4)


def test_settings_accept_any_batch_with_a_prompt_per_rank(tmp_path):
    recipe_dict = small_run_recipe("unused", tmp_path, trainer={"prompts_per_step": 3, "prompts_per_minibatch": 1,
                                                                "micro_batch_size": 1})
    from urlvr.recipe import load_recipe

    recipe = load_recipe(recipe_dict)
    settings = [RunSettings.derive(recipe, DistInfo(rank, 2, rank, torch.device("cpu"))) for rank in range(2)]
    assert [s.prompt_shard for s in settings] == [range(0, 2), range(2, 3)]
    assert [s.first_prompt_index() for s in settings] == [0, 2]
    assert settings[0].micro_steps_per_minibatch == settings[1].micro_steps_per_minibatch == 2  # 4 rows: 2 and 2
    with pytest.raises(ValueError, match=r"prompts_per_step \(3\) is smaller than the world size \(4\)"):
        RunSettings.derive(recipe, DistInfo(0, 4, 0, torch.device("cpu")))
