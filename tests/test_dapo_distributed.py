"""Dynamic sampling on two CPU processes (gloo, ZeRO-2 under torchrun) trains like one process.

Why the runs are comparable: the selection of the step's groups reads only the gathered
per-group flags (first prompts_per_step informative groups in draw order), refill prompts carry
global indices (round r: r*P ..), and each rank trains its contiguous share of the selection,
receiving whole groups drawn by the other rank. So the trained groups, their order and the
gradient are one process's, and every metric matches (float noise aside), the rewards of every
generated group (`dynamic_sampling/generated_*`, gathered from both ranks) included. With rounds
of 5 prompts for a step of 4, rank 0 draws 3 groups a round and rank 1 draws 2, while each trains 2.
"""

from __future__ import annotations

import pytest
import yaml

import urlvr
from test_dapo import tiny_majority_recipe
from test_distributed import (WEIGHT_ATOL, WORLD, assert_metrics_close, launch, max_weight_diff, read_metrics,
                              read_weights, seen_by_rank)
from urlvr.dist import even_shard

pytestmark = pytest.mark.slow
DYNAMIC = {"name": "zero_variance", "max_rounds": 4}


def recipe(out, zero_stage: int, dynamic: dict) -> dict:
    r = tiny_majority_recipe(out, dynamic)
    # weight 0: trains nothing, records every group a rank rewards (tests/reward_plugins.py)
    r["plugins"] = ["reward_plugins"]
    r["reward"]["terms"].append({"name": "test_short_response", "weight": 0.0})
    r["trainer"]["export_final_model"] = True
    r["optim"] = {"lr": 1e-3, "deepspeed": {"zero_stage": zero_stage}}
    return r


@pytest.mark.parametrize("dynamic", [DYNAMIC, {**DYNAMIC, "prompts_per_round": 5}], ids=["rounds_of_a_step", "rounds_of_5"])
def test_two_processes_sample_dynamically_like_one(tmp_path, dynamic):
    import reward_plugins

    reward_plugins.SEEN_GROUPS.clear()
    single = urlvr.train(recipe(tmp_path / "single", zero_stage=0, dynamic=dynamic))
    drawn = [prompt_id for prompt_id, _, _ in reward_plugins.SEEN_GROUPS]  # every round's global batch, in order
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path / "two", zero_stage=2, dynamic=dynamic)))
    launch("torchrun", ["train", str(path)], tmp_path, "two")
    one, two = read_metrics(single.run_dir), read_metrics(tmp_path / "two")
    assert any(m["dynamic_sampling/rounds"] > 1 for m in one), "the test needs refill rounds"
    per_round = dynamic.get("prompts_per_round", 4)
    assert all(m["dynamic_sampling/prompts_consumed"] == per_round * m["dynamic_sampling/rounds"] for m in two)
    assert "dynamic_sampling/generated_proxy_mean" in two[0]
    # each rank rewarded whole groups: its slice even_shard(R, 2, rank) of every round's global batch
    seen = seen_by_rank(tmp_path / "two-seen")
    rounds = int(sum(m["dynamic_sampling/rounds"] for m in one))
    assert len(drawn) == rounds * per_round
    for rank, calls in seen.items():
        shard = even_shard(per_round, WORLD, rank)
        assert [call["prompt_id"] for call in calls] == [
            drawn[r * per_round + i] for r in range(rounds) for i in shard], rank
        assert all(len(call["lengths"]) == 2 for call in calls)
    assert_metrics_close(one, two, "dynamic sampling, 2 processes vs 1")
    diff = max_weight_diff(read_weights(single.run_dir), read_weights(tmp_path / "two"))
    assert diff <= WEIGHT_ATOL, f"final weights differ by {diff}"
