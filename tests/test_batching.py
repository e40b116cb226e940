"""Micro-batching (fixed, bucketed by length, token budget, padding-free packing): every row once,
micro-batches that keep each token's position, less padding on mixed lengths (none when packed),
and the same gradient whichever plan cuts the mini-batch (global normalisers)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import urlvr
from conftest import small_run_recipe
from urlvr.algorithms.losses import token_weights
from urlvr.recipe.sections.optimisation import TrainerSection
from urlvr.rollout.base import Group, PromptInput, Sample
from urlvr.rollout.collate import collate_groups, position_ids_from_attention_mask
from urlvr.trainer.actor import TokenScorer
from urlvr.errors import RecipeError
from urlvr.trainer.batching import (
    RowInputs,
    budget_warning,
    check_padding_free,
    micro_batches,
    padding_summary,
    plan_micro_batches,
    scatter_rows,
    scorer_inputs,
)

PROMPTS = [(5, 3), (2, 3), (4, 3)]  # (prompt tokens, samples) per group
RESPONSES = [1, 9, 2, 8, 3, 7, 9, 1, 5]  # mixed lengths, long and short interleaved
MODES = {
    "fixed": {"micro_batch_size": 3},
    "bucketed": {"micro_batch_size": 3, "bucket_by_length": True},
    "token_budget": {"max_tokens_per_micro_batch": 30},
    "padding_free": {"max_tokens_per_micro_batch": 30, "padding_free": True},
}


def mixed_batch(vocab: int = 64):
    gen = torch.Generator().manual_seed(0)
    groups, responses = [], iter(RESPONSES)
    for g, (prompt_len, samples) in enumerate(PROMPTS):
        prompt = PromptInput(f"p{g}", "", tuple(torch.randint(3, vocab, (prompt_len,), generator=gen).tolist()))
        group_samples = []
        for _ in range(samples):
            n = next(responses)
            group_samples.append(Sample(tuple(torch.randint(3, vocab, (n,), generator=gen).tolist()),
                                        tuple([-1.0] * n), "", "stop"))
        groups.append(Group(prompt, tuple(group_samples)))
    return collate_groups(groups, pad_token_id=0)


def lengths(batch):
    return batch.attention_mask[:, :batch.prompt_length].sum(1).tolist(), batch.response_mask.sum(1).tolist()


def test_plans_take_every_row_once_and_keep_the_budget():
    prompts, responses = lengths(mixed_batch())
    rows = range(len(RESPONSES))
    for mode, knobs in MODES.items():
        plan = plan_micro_batches(prompts, responses, rows, rows_per_micro_batch=knobs.get("micro_batch_size", 8),
                                  max_tokens=knobs.get("max_tokens_per_micro_batch"),
                                  bucket_by_length=knobs.get("bucket_by_length", False),
                                  packed=knobs.get("padding_free", False))
        assert sorted(r for micro in plan for r in micro) == list(rows), mode
    budget = plan_micro_batches(prompts, responses, rows, rows_per_micro_batch=8, max_tokens=30)
    for micro in budget:  # rows x (longest prompt + longest response) within the budget, or one row alone
        width = max(prompts[r] for r in micro) + max(responses[r] for r in micro)
        assert len(micro) * width <= 30 or len(micro) == 1
    assert plan_micro_batches(prompts, responses, rows, rows_per_micro_batch=3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert plan_micro_batches([1], [50], [0], rows_per_micro_batch=1, max_tokens=10) == [[0]]  # over budget: alone
    packed = plan_micro_batches(prompts, responses, rows, rows_per_micro_batch=8, max_tokens=30, packed=True)
    for micro in packed:  # the real tokens within the budget, or one row alone
        assert sum(prompts[r] + responses[r] for r in micro) <= 30 or len(micro) == 1
    assert len(packed) < len(budget)  # counting real tokens, the same budget holds more rows


def test_trimmed_micro_batches_keep_positions_and_cut_only_padding():
    batch = mixed_batch()
    positions = position_ids_from_attention_mask(batch.attention_mask)
    for mode, knobs in MODES.items():
        for micro in micro_batches(batch, range(9), TrainerSection(**knobs)):
            if micro.predict_index is not None:
                _check_packed(batch, micro)
                continue
            rows, p = micro.rows, micro.prompt_length
            t = micro.response_mask.shape[1]
            columns = slice(batch.prompt_length - p, batch.prompt_length + t)
            assert torch.equal(micro.position_ids, positions[rows, columns]), mode
            assert micro.attention_mask.sum() == batch.attention_mask[rows].sum(), f"{mode}: a real token was cut"
            assert micro.response_mask.sum() == batch.response_mask[rows].sum()


def _check_packed(batch, micro):
    """One row of the micro-batch's real tokens, sequence after sequence, positions restarting at
    0; predict_index points at the token before each real response token."""
    prompts, responses = lengths(batch)
    ids, positions = micro.input_ids[0], micro.position_ids[0]
    assert micro.attention_mask is None and micro.input_ids.shape[0] == 1
    offset, predicted = 0, []
    for row in micro.rows.tolist():
        p, t = prompts[row], responses[row]
        want = batch.input_ids[row, batch.prompt_length - p:batch.prompt_length + t]
        assert torch.equal(ids[offset:offset + p + t], want) and torch.equal(positions[offset:offset + p + t], torch.arange(p + t))
        predicted += range(offset + p - 1, offset + p - 1 + t)
        offset += p + t
    assert offset == ids.shape[0] and micro.predict_index.tolist() == predicted
    assert int(micro.response_mask.sum()) == len(predicted)


def test_bucketing_and_token_budget_cut_the_padding_on_mixed_lengths():
    batch = mixed_batch()
    fraction = {mode: padding_summary(micro_batches(batch, range(9), TrainerSection(**knobs)))["perf/padding_fraction"]
                for mode, knobs in MODES.items()}
    assert fraction["bucketed"] < fraction["fixed"] and fraction["token_budget"] < fraction["fixed"], fraction
    assert fraction["padding_free"] == 0.0


def _gradient(model, batch, knobs) -> dict[str, torch.Tensor]:
    """Token-mean policy-gradient loss (-A * log pi, global normalisers) summed over micro-batches."""
    scorer = TokenScorer(copy.deepcopy(model))
    advantages = torch.linspace(-1.0, 1.0, batch.input_ids.shape[0])
    num_tokens = int(batch.response_mask.sum())
    micros = micro_batches(batch, range(9), TrainerSection(**knobs), RowInputs(advantages=advantages))
    logprobs = []
    for micro in micros:
        out = scorer(**scorer_inputs(micro, "cpu"), temperature=1.0, stats=("logprob",))
        mask = micro.response_mask.float()
        weights = token_weights(mask, "token-mean", max_response_length=9, num_sequences=9, num_tokens=num_tokens)
        (weights * -micro.advantages[:, None] * out["logprob"]).sum().backward()
        logprobs.append((micro, {"logprob": out["logprob"].detach()}))
    scattered = scatter_rows(logprobs, *batch.response_mask.shape)["logprob"] * batch.response_mask
    return {"logprob": scattered, **{n: p.grad for n, p in scorer.named_parameters() if p.grad is not None}}


def test_fixed_bucketed_and_token_budget_micro_batches_give_the_same_gradient(random_tiny_model):
    model = random_tiny_model[1].double()  # float64: the comparison tests the plans, not float32 noise
    try:
        batch = mixed_batch()
        results = {mode: _gradient(model, batch, knobs) for mode, knobs in MODES.items()}
    finally:
        random_tiny_model[1].float()
    want = results["fixed"]
    for mode, got in results.items():
        for name in want:
            assert torch.allclose(got[name], want[name], rtol=1e-9, atol=1e-12), (mode, name)


def test_token_budget_and_bucketed_runs_train_like_fixed(random_tiny_model, tmp_path):
    """The whole step: one optimizer step with a varying number of micro-batches (DeepSpeed's
    accumulation boundary marked by the loop) lands on the weights of fixed micro-batches."""
    runs = {}
    rows = {"micro_batch_size": 4}  # not beside a token budget, which cuts the micro-batches itself
    for mode, knobs in {"fixed": rows, "bucketed": {**rows, "bucket_by_length": True},
                        "token_budget": {"max_tokens_per_micro_batch": 100},
                        "padding_free": {"max_tokens_per_micro_batch": 100, "padding_free": True}}.items():
        recipe = small_run_recipe(
            random_tiny_model[0], tmp_path / mode, plugins=["reward_plugins"],
            reward={"terms": [{"name": "test_short_response"}], "oracle": "ground_truth"},
            rollout={"group_size": 4, "max_new_tokens": 12, "stop_token_ids": [3, 4, 5, 6, 7]},  # mixed lengths
            trainer={"total_steps": 1, "prompts_per_step": 4, "prompts_per_minibatch": 4, "save_every": 0, **knobs},
            # a large Adam eps keeps the first update linear in the gradient (not lr x sign(g), which
            # turns float noise in a near-zero gradient into a full lr step)
            optim={"lr": 1e-3, "adam_eps": 1e-2}, dynamics={"token_metrics": []}, collapse={"detectors": []})
        runs[mode] = urlvr.train(recipe)
    weights = {mode: load_file(run.final_model_dir / "model.safetensors") for mode, run in runs.items()}
    metrics = {mode: run.metrics[0] for mode, run in runs.items()}
    initial = load_file(random_tiny_model[0] / "model.safetensors")
    assert max(float((weights["fixed"][k] - initial[k]).abs().max()) for k in initial) > 1e-4  # the step moved them
    for mode in ("bucketed", "token_budget", "padding_free"):
        # float32 noise only: a few ulps of weights of order 1 (the float64 gradient test above is exact)
        assert max(float((weights[mode][k] - weights["fixed"][k]).abs().max()) for k in initial) < 5e-7, mode
        assert metrics[mode]["loss/policy"] == pytest.approx(metrics["fixed"]["loss/policy"], rel=1e-5, abs=1e-7)
    assert all(0.0 <= m["perf/padding_fraction"] < 1.0 and m["perf/tokens_per_forward"] > 0 for m in metrics.values())
    assert metrics["padding_free"]["perf/padding_fraction"] == 0.0


def test_padding_free_refuses_a_model_whose_attention_ignores_the_packing(random_tiny_model):
    """The start-up check: the tiny Llama honours packed position_ids (transformers builds the
    block-diagonal mask from them); the same model handed a full attention mask does not (each
    packed sequence then attends to the one before it), and is refused."""
    scorer = TokenScorer(random_tiny_model[1])

    def score(micro, leak=False):
        inputs = scorer_inputs(micro, "cpu")
        if leak and inputs["attention_mask"] is None:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        with torch.no_grad():
            return scorer(**inputs, temperature=1.0, stats=("logprob",))

    check_padding_free(score, tolerance=1e-5)
    with pytest.raises(RecipeError, match="does not honour packed position_ids"):
        check_padding_free(lambda micro: score(micro, leak=True), tolerance=1e-5)


def test_padding_free_needs_a_token_budget():
    with pytest.raises(ValueError, match="set that budget too"):
        TrainerSection(padding_free=True)


def test_loss_metrics_do_not_depend_on_how_micro_batches_are_cut(random_tiny_model, tmp_path):
    """Off-policy (a second epoch over the rollout, so ratios move off 1): the ratio's max, min
    and token mean and the clip fraction are the same for 4-row micro-batches, 1-row ones and a
    token budget; a mean of per-micro-batch maxima (the old reduction) differed by 20%."""
    logged = {}
    for mode, knobs in {"fixed": {"micro_batch_size": 4}, "one_row": {"micro_batch_size": 1},
                        "packed": {"max_tokens_per_micro_batch": 40, "padding_free": True}}.items():
        recipe = small_run_recipe(
            random_tiny_model[0], tmp_path / mode, plugins=["reward_plugins"],
            reward={"terms": [{"name": "test_short_response"}], "oracle": "ground_truth"},
            rollout={"group_size": 4, "max_new_tokens": 12, "stop_token_ids": [3, 4, 5, 6, 7]},
            trainer={"total_steps": 1, "prompts_per_step": 4, "prompts_per_minibatch": 4, "ppo_epochs": 2,
                     "save_every": 0, "export_final_model": False, **knobs},
            optim={"lr": 1e-2}, algorithm={"loss": {"name": "ppo_clip", "clip_eps_low": 0.02, "clip_eps_high": 0.02}},
            dynamics={"token_metrics": []}, collapse={"detectors": []})
        logged[mode] = urlvr.train(recipe).metrics[0]
    assert logged["fixed"]["actor/ratio_max"] > 1.0 + 1e-4  # the second epoch moved the ratios
    for mode in ("one_row", "packed"):
        for key in ("actor/ratio_mean", "actor/ratio_max", "actor/ratio_min", "actor/clip_fraction"):
            assert logged[mode][key] == pytest.approx(logged["fixed"][key], rel=1e-4, abs=1e-6), (mode, key)


def test_budget_warning_names_the_numbers_only_below_one_full_row():
    assert budget_warning(None, 30, 12) is None and budget_warning(42, 30, 12) is None
    assert budget_warning(41, 30, 12) == (
        "urlvr: warning: trainer.max_tokens_per_micro_batch=41 is below one full-length row (longest prompt 30 + "
        "rollout.max_new_tokens 12 = 42 tokens): a row longer than 41 tokens runs alone in a forward of its own, "
        "over the budget; set the budget to at least 42, or lower rollout.max_new_tokens")


def test_a_budget_below_one_row_is_said_once_at_start(random_tiny_model, tmp_path, capsys):
    """It ran one row per forward without a word (the planner's slow path); now one line at start,
    not one per step, and the run still trains (the planner lets such a row go alone)."""
    recipe = small_run_recipe(random_tiny_model[0], tmp_path / "run", trainer={"max_tokens_per_micro_batch": 20,
                                                                               "export_final_model": False})
    result = urlvr.train(recipe)
    assert len(result.metrics) == 2
    err = capsys.readouterr().err
    assert err.count("urlvr: warning: trainer.max_tokens_per_micro_batch=20 is below one full-length row") == 1
    assert "+ rollout.max_new_tokens 12 = " in err
