"""A logged value describes the step it is logged with, over the tensors it names: the learning
rate the step used (not the scheduler's next one), and the statistics of every sampled token even
where the update masked rows (`algorithm.mask_truncated`)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import urlvr
from conftest import small_run_recipe

SHORT = {"terms": [{"name": "test_short_response"}], "oracle": "ground_truth"}
MIXED = {"group_size": 4, "max_new_tokens": 12, "stop_token_ids": [3, 4, 5, 6, 7]}  # responses of different lengths


def lr_factor(k: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` optimizer steps, then cosine to `min_ratio` at `total` (written
    from the schedule's documentation, docs/recipe.md `optim.schedule`)."""
    if k < warmup:
        return (k + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, (k - warmup) / max(1, total - warmup))))


@pytest.mark.parametrize("minibatches", [1, 2])
def test_logged_lr_is_the_rate_the_step_used(random_tiny_model, tmp_path, minibatches) -> None:
    """3-step warm-up then cosine: step s logs the mean rate of its own optimizer steps (issue 19.5:
    it logged the next step's rate, 2·lr/3 for a first step made at lr/3)."""
    lr, steps = 1e-3, 4
    recipe = small_run_recipe(random_tiny_model[0], tmp_path / "run", plugins=["reward_plugins"], reward=SHORT,
                              optim={"lr": lr, "warmup_steps": 3, "schedule": "cosine", "min_lr_ratio": 0.1},
                              trainer={"total_steps": steps, "prompts_per_minibatch": 4 // minibatches})
    logged = [m["actor/lr"] for m in urlvr.train(recipe).metrics]
    total = steps * minibatches
    want = [lr * sum(lr_factor(s * minibatches + i, 3, total, 0.1) for i in range(minibatches)) / minibatches
            for s in range(steps)]
    assert logged == pytest.approx(want, rel=1e-9)


def test_first_step_moves_the_weights_by_the_logged_rate(random_tiny_model, tmp_path) -> None:
    """Adam's first step moves a parameter by lr·g/(|g|+eps) ≈ lr: the largest weight change of a
    one-step run measures the rate that step used, independently of the scheduler's bookkeeping."""
    path, model, _ = random_tiny_model
    recipe = small_run_recipe(path, tmp_path / "run", plugins=["reward_plugins"], reward=SHORT,
                              optim={"lr": 1e-3, "warmup_steps": 3, "weight_decay": 0.0, "grad_clip": None},
                              trainer={"total_steps": 1})
    result = urlvr.train(recipe)
    after = load_file(result.final_model_dir / "model.safetensors")
    moved = max(float((after[name] - p.detach()).abs().max()) for name, p in model.state_dict().items() if name in after)
    assert moved == pytest.approx(1e-3 / 3, rel=0.02)
    assert result.metrics[0]["actor/lr"] == pytest.approx(1e-3 / 3, rel=1e-9)


METRICS = ("actor/entropy_mean", "rollout/logprob_mismatch_mean", "rollout/logprob_mismatch_max", "rollout/mismatch_kl",
           "actor/kl_to_initial")


@pytest.mark.parametrize("trainer", [{"micro_batch_size": 16}, {"micro_batch_size": 2},
                                     {"max_tokens_per_micro_batch": 64, "padding_free": True}])
def test_metrics_under_mask_truncated_describe_every_sampled_token(random_tiny_model, tmp_path, trainer) -> None:
    """Step 1's rollout and pre-update policy do not depend on `mask_truncated`, so neither may its
    rollout metrics (issue 19.4: entropy read 0.039 for 0.051 and the sampler mismatch 3.6 for
    7e-6, from masked rows read as zeros). No scoring pass runs here (majority-style reward, one
    optimizer step): the statistics come from the training forwards."""
    runs = {}
    for masked in (False, True):
        recipe = small_run_recipe(random_tiny_model[0], tmp_path / f"masked{masked}", plugins=["reward_plugins"],
                                  reward=SHORT, rollout=MIXED, algorithm={"mask_truncated": masked},
                                  dynamics={"token_metrics": ["entropy"], "kl_to_initial_every": 1},
                                  trainer={"total_steps": 1, **trainer})
        runs[masked] = urlvr.train(recipe).metrics[0]
    assert 0 < runs[True]["response/truncation_rate"] < 1  # some rows masked, some trained
    assert runs[True]["rollout/logprob_mismatch_max"] < 1e-4  # the sampler is this policy: no mismatch
    for key in METRICS:
        assert runs[True][key] == pytest.approx(runs[False][key], rel=1e-4, abs=1e-6), key


def test_a_resume_that_extends_a_cosine_run_follows_the_new_schedule_at_once(random_tiny_model, tmp_path) -> None:
    """3 cosine steps, then a resume to 6: steps 4-6 train at the 6-step schedule's rates (the rates
    of a fresh 6-step run's steps 4-6), the first of them included. It trained at the finished
    schedule's last rate, 0 (a breaker's finding: the restored optimizer's rate was used once)."""
    lr = 1e-3

    def recipe(out, steps):
        return small_run_recipe(random_tiny_model[0], out, plugins=["reward_plugins"], reward=SHORT,
                                optim={"lr": lr, "schedule": "cosine"}, trainer={"total_steps": steps, "save_every": 1})

    urlvr.train(recipe(tmp_path / "run", 3))
    resumed = urlvr.train(recipe(tmp_path / "run", 6), resume=tmp_path / "run").metrics
    fresh = urlvr.train(recipe(tmp_path / "fresh", 6)).metrics
    want = [lr * lr_factor(k, 0, 6, 0.0) for k in (3, 4, 5)]  # 5e-4, 2.5e-4, 6.7e-5
    assert [m["actor/lr"] for m in resumed[-3:]] == pytest.approx(want, rel=1e-9)
    assert [m["actor/lr"] for m in fresh[3:]] == pytest.approx(want, rel=1e-9)
