"""reasoning-gym: the data source (generated locally), the verifier reward on two tasks, and two
training steps of the tiny model on one task."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("reasoning_gym", reason="the reasoning-gym extra is not installed")

import urlvr  # noqa: E402
import urlvr.builtins  # noqa: E402,F401
from urlvr.data.loaders import load_records  # noqa: E402
from urlvr.data.records import DataError  # noqa: E402
from urlvr.rewards.base import REWARDS, LabelAccessError, RewardContext, call_reward  # noqa: E402
from urlvr.rewards.extractors import extract_boxed  # noqa: E402
from urlvr.rollout.base import Group, PromptInput, Sample  # noqa: E402


def score(record, texts) -> list[float]:
    samples = tuple(Sample((1,), (0.0,), t, "eos") for t in texts)
    group = Group(PromptInput(record.prompt_id, record.prompt, (5,)), samples)
    ctx = RewardContext.for_group([extract_boxed(t) for t in texts], torch.ones(len(texts), 1),
                                  extract_answer=extract_boxed, label=record.label, metadata=record.metadata,
                                  question=record.prompt)
    return list(call_reward(REWARDS.get("reasoning_gym"), group, ctx, {}).scores)


def test_source_is_reproducible_and_labelled():
    options = {"tasks": ["countdown", "basic_arithmetic"], "size": 3, "seed": 5}
    records = load_records("reasoning_gym", **options)
    assert [r.metadata["reasoning_gym_task"] for r in records] == ["countdown"] * 3 + ["basic_arithmetic"] * 3
    assert all(r.label for r in records) and len({r.prompt_id for r in records}) == 6
    assert [r.prompt for r in load_records("reasoning_gym", **options)] == [r.prompt for r in records]


def test_task_config_reaches_the_generator():
    records = load_records("reasoning_gym", tasks=["countdown"], size=4, seed=0,
                           config={"countdown": {"min_numbers": 3, "max_numbers": 3}})
    assert all(len(r.metadata["reasoning_gym_metadata"]["numbers"]) == 3 for r in records)


def test_unknown_task_is_a_one_line_data_error():
    with pytest.raises(DataError, match="reasoning_gym task 'no_such_task'"):
        load_records("reasoning_gym", tasks=["no_such_task"], size=1, seed=0)


@pytest.mark.parametrize("task", ["countdown", "basic_arithmetic"])
def test_the_task_verifier_scores_the_extracted_answer(task):
    (record,) = load_records("reasoning_gym", tasks=[task], size=1, seed=1)
    right = f"so \\boxed{{{record.label}}}"
    scores = score(record, [right, "\\boxed{12345678}", "no answer at all", "\\boxed{" + "(" * 500 + "}"])
    assert scores[0] == 1.0 and scores[2] == 0.0
    assert all(0.0 <= s < 1.0 for s in scores[1:])


def test_the_reward_is_an_oracle():
    assert REWARDS.get("reasoning_gym").needs_label
    (record,) = load_records("reasoning_gym", tasks=["basic_arithmetic"], size=1, seed=1)
    ctx = RewardContext.for_group(["1"], torch.ones(1, 1), extract_answer=extract_boxed, label=record.label,
                                  metadata=record.metadata)
    with pytest.raises(LabelAccessError):
        REWARDS.get("reasoning_gym").fn(None, ctx)  # without call_reward's label access


def test_tiny_model_trains_two_steps_on_basic_arithmetic(tmp_path):
    recipe = {
        "seed": 0, "output_dir": str(tmp_path / "run"), "model": {"path": "urlvr/tiny"},
        "data": {"source": {"kind": "reasoning_gym", "tasks": ["basic_arithmetic"], "size": 16, "seed": 0,
                            "config": {"basic_arithmetic": {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                            "max_digits": 2}}}},
        "rollout": {"group_size": 4, "max_new_tokens": 40},
        "reward": {"terms": [{"name": "majority_vote"}], "oracle": "reasoning_gym"},
        "trainer": {"total_steps": 2, "prompts_per_step": 4, "prompts_per_minibatch": 4, "micro_batch_size": 16,
                    "save_every": 0, "export_final_model": False},
        "optim": {"lr": 1e-4}, "logging": {"console": False},
    }
    result = urlvr.train(recipe)
    assert [m["step"] for m in result.metrics] == [1, 2]
    assert all(0.0 <= m["reward/ground_truth_mean"] <= 1.0 for m in result.metrics)
