"""Who holds which rows (urlvr/trainer/sharding.py): whole prompts per rank for rollout, an even
share of every mini-batch's rows for the update, the same number of calls on every rank.
The multi-process runs are in test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from urlvr.dist import DistInfo, even_shard
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


def test_a_world_of_one_scores_the_batch_as_one_run():
    layout = RowLayout(rows=48, rows_per_minibatch=16, micro_batch_size=5, world_size=1, rank=0)
    assert layout.scored_rows() == [range(0, 48)]  # chunked across mini-batches, exactly as before sharding
    assert layout.micro_steps_per_minibatch == 4


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
