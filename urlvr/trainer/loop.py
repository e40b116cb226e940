"""The GRPO loop. `grpo_step` is the whole algorithm for one rollout batch, top to bottom, one
named and timed function per stage, each handing a record on (trainer/stages.py):
rollout (`Rollout`) -> score and reward (`Scored`; a forward only when needed) -> advantage
-> update (`MicroBatch`es -> `UpdateResult`) -> weight sync -> metrics (metrics/step.py).

Where it departs from the papers it follows, on purpose (docs/step.md):
- On-policy means one optimizer step per rollout batch (Table 7). When no reward reads token
  statistics, there is no scoring forward: old log-probs are the detached log-probs of the
  training forward itself (ratio exactly 1), which also computes the logged statistics. Otherwise
  (`RunSettings.scoring_pass`) a scoring forward over the same micro-batches computes the old
  log-probs and exactly the declared statistics, and the ratio is exactly 1 all the same.
- Every aggregation mode uses mini-batch-wide normalisers summed over ranks, so micro-batching and
  the number of ranks change no gradient (verl normalises per micro-batch in some modes).
- Groups never split across ranks for rollout, rewards and advantages; the update spreads each
  mini-batch's rows evenly over ranks (trainer/sharding.py), so any batch runs on any number of
  ranks. Labels reach the loss only through an oracle reward the recipe names as a term, never
  through `reward.oracle` (metrics only).
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

import torch

from urlvr.algorithms.advantages import ADVANTAGE_ESTIMATORS
from urlvr.dist import DistInfo, all_gather_objects, all_gather_rows
from urlvr.metrics import step as step_metrics, tracking
from urlvr.rewards.policy import EnginePolicy
from urlvr.rollout.base import Group, RolloutBatch
from urlvr.rollout.collate import collate_groups
from urlvr.trainer.build import RunParts
from urlvr.trainer.dynamic_sampling import Round, dynamic_sample
from urlvr.trainer.scoring import reference_logprobs, score_global_batch, score_masked_rows, score_rows
from urlvr.trainer.stages import Rollout, Scored, StageTimer, UpdateResult, policy_handle, score_and_reward
from urlvr.trainer.update import update_policy


def grpo_step(parts: RunParts, dist: DistInfo, step: int) -> tuple[dict[str, float], list[dict], list[dict]]:
    """One GRPO step: this rank's whole groups for rollout, rewards and advantages, its even share
    of every mini-batch's rows for the update; returns (metrics, completions, per-prompt tracking
    rows of every rank). Reads the recipe through `parts.settings` only."""
    settings, timer, step_start = parts.settings, StageTimer(), time.perf_counter()
    with timer("rollout"):  # this rank's whole prompts; every group stays on one rank
        rollout = sample_rollout(parts, dist, step)
    with timer("score"):  # KL to pi_0 (a penalty, or measured), and the rows the update will mask
        reference = reference_logprobs(parts, rollout.batch) if settings.measures_kl(step) else None
        masked = score_masked_rows(parts, rollout)
    # old log-probs + exactly the declared statistics ([B*G, T] each); else the training forward gives them
    scored = score_and_reward(rollout, lambda r: score_global_batch(parts, r.batch) if settings.scoring_pass else {},
                              _policy(parts, step, rollout.first_prompt), settings, parts.tokenizer, timer)
    with timer("advantage"):
        scored = with_advantages(parts, scored, dist.device, rollout, step)
    with timer("update"):
        parts.engine.offload()  # a vLLM engine frees the device for the actor (sleep mode)
        update = update_policy(parts, rollout, scored, reference, masked, step)
    with timer("weight_sync"):  # the next rollout (and any evaluation) samples the updated policy
        parts.producer.sync(parts.actor.model, version=step)
    with timer("metrics"):
        metrics, prompt_rows = _step_metrics(parts, rollout, scored, update, reference, timer, step)
    metrics["time/step"] = time.perf_counter() - step_start
    metrics["perf/tokens_per_second"] = metrics["perf/response_tokens"] / metrics["time/step"]
    completions = _completions(rollout, scored, settings.recipe.logging.completions_per_step, step)
    return metrics, completions, prompt_rows


# --------------------------------------------------------------------------- the stages
def sample_rollout(parts: RunParts, dist: DistInfo, step: int) -> Rollout:
    """This rank's prompts and groups (DAPO's dynamic sampling: rounds of generate -> reward ->
    filter, refilled), and the global batch every rank collates, as one process would, to score
    and train its rows of it."""
    settings, recipe = parts.settings, parts.settings.recipe
    rewards, sampling_metrics = None, {}
    if recipe.rollout.dynamic_sampling.name != "none":
        sampled = dynamic_sample(parts.stream.next_batch, lambda batch_records, round_index: _sample_round(
            parts, dist, step, batch_records, round_index), recipe.rollout.dynamic_sampling,
            recipe.trainer.prompts_per_step, settings.prompts_per_round, dist)
        records, drawn, groups = sampled.records, sampled.drawn, sampled.groups
        rewards, sampling_metrics = sampled.rewards, sampled.metrics
    else:  # sampled now, or asked for up to trainer.max_staleness steps ahead (trainer/producer.py)
        produced = parts.producer.rollout(step)
        records, drawn, sampling_metrics = produced.records, produced.drawn, produced.metrics
        groups = _trained(parts, drawn)
    every_group = all_gather_objects(groups)
    batch = _to_device(collate_groups(every_group, pad_token_id=parts.tokenizer.pad_token_id), dist.device)
    truncated = _truncated_rows(every_group, batch) if recipe.algorithm.mask_truncated else None  # [B*G] bool
    return Rollout(records, drawn, groups, batch, settings.own_rows, settings.first_prompt_index(), rewards,
                   sampling_metrics, truncated)


def with_advantages(parts: RunParts, scored: Scored, device: torch.device, rollout: Rollout, step: int) -> Scored:
    """`scored` with the advantages of the global batch `[B*G]`: each rank's groups `[B, G]` by
    the recipe's estimator, one per sample (broadcast over its tokens by the loss), gathered;
    then `algorithm.advantage_shaping`, over the whole global batch, the same on every rank."""
    algo = parts.settings.recipe.algorithm
    estimator = ADVANTAGE_ESTIMATORS.get(algo.advantage)
    local = estimator(scored.rewards.total.double(), eps=algo.advantage_eps)  # [B, G] float64
    shape = getattr(algo.advantage_shaping, "shape", None)  # `none` has nothing to do
    if shape is None:
        return replace(scored, advantages=all_gather_rows(local.float().flatten()).to(device))
    group_size = local.shape[1]
    shaped, parts.advantage_state, metrics = shape(
        parts.advantage_state, all_gather_objects([r.prompt_id for r in rollout.records]),
        all_gather_objects([list(ctx.voters) for ctx in scored.contexts]),
        all_gather_objects([list(ctx.answers) for ctx in scored.contexts]),
        all_gather_rows(local.flatten()).view(-1, group_size), random.Random(parts.settings.shaping_seed(step)),
        estimate=lambda rewards: estimator(rewards, eps=algo.advantage_eps))
    return replace(scored, advantages=shaped.float().flatten().to(device), advantage_metrics=metrics)


# --------------------------------------------------------------------------- rollout helpers
def _generate(parts: RunParts, records, sampling) -> tuple[list[Group], list[Group]]:
    """(voting groups, trained groups) of `records`: `vote_group_size` samples drawn, the first
    `group_size` of each trained (TTRL: draw more samples to vote than to train)."""
    with parts.generation_context():
        drawn = parts.engine.generate([parts.prompts[r.prompt_id] for r in records], parts.settings.vote_group_size,
                                      sampling)
    return drawn, _trained(parts, drawn)


def _trained(parts: RunParts, drawn: list[Group]) -> list[Group]:
    """The trained groups: the first `group_size` samples of each voting group."""
    return [replace(g, samples=g.samples[:parts.settings.group_size]) for g in drawn]


def _sample_round(parts: RunParts, dist: DistInfo, step: int, records, round_index: int) -> Round:
    """One round of dynamic sampling on this rank: generate, score its own new groups only if a
    reward reads token statistics (the step's scoring pass runs again on the selected groups), reward."""
    settings = parts.settings
    drawn, groups = _generate(parts, records, settings.round_sampling(step, round_index, len(records)))
    batch = _to_device(collate_groups(groups, pad_token_id=parts.tokenizer.pad_token_id), dist.device)
    rows = range(batch.input_ids.shape[0])
    rollout = Rollout(records, drawn, groups, batch, slice(rows.start, rows.stop), settings.round_first_index(round_index))
    scored = score_and_reward(rollout, lambda r: score_rows(parts, r.batch, rows) if settings.reward_stats else {},
                              _policy(parts, step, rollout.first_prompt), settings, parts.tokenizer)
    return Round(records, drawn, groups, scored.contexts, scored.rewards)


def _policy(parts: RunParts, step: int, first_prompt: int) -> EnginePolicy:
    """The policy handle of this rank's rewards, seeded by the step and its first prompt's global index."""
    return policy_handle(parts.engine, parts.tokenizer, parts.settings, parts.settings.sampling_seed(step, first_prompt),
                         parts.generation_context)


def _truncated_rows(groups, batch: RolloutBatch) -> torch.Tensor:
    """`[B*G]` bool in the batch's row order: the samples whose finish reason is `length`.
    `algorithm.mask_truncated` zeroes their response mask for the update (no loss weight, no
    tokens in the normalisers); the metrics still describe them."""
    return torch.tensor([s.finish_reason == "length" for g in groups for s in g.samples],
                        device=batch.response_mask.device)


def _to_device(batch: RolloutBatch, device: torch.device) -> RolloutBatch:
    if device.type == "cpu":
        return batch
    return replace(batch, **{k: getattr(batch, k).to(device) for k in
                             ("input_ids", "attention_mask", "response_mask", "sampler_logprobs")})


# --------------------------------------------------------------------------- what the step logs
def _step_metrics(parts: RunParts, rollout: Rollout, scored: Scored, update: UpdateResult,
                  reference: torch.Tensor | None, timer: StageTimer, step: int) -> tuple[dict[str, float], list[dict]]:
    """Each rank measures its own groups (rows `rollout.own` of the global batch); metrics/step.py
    reduces them over ranks. Returns (metrics, per-prompt tracking rows of every rank)."""
    settings, own, batch = parts.settings, rollout.own, rollout.batch  # the metrics describe every sampled row
    recipe, mask = settings.recipe, batch.response_mask[own].float()
    local, counts = step_metrics.rank_metrics(rollout.groups, scored.contexts, scored.rewards, mask, update.logs,
                                              timer, update.correction, ngram=recipe.dynamics.repetition_ngram)
    token_means, extremes = step_metrics.token_metrics(
        {name: update.stats[name][own] for name in ("logprob", *settings.metric_stats)}, batch.sampler_logprobs[own],
        mask, settings.metric_stats, update.correction, None if reference is None else reference[own])
    metrics = step_metrics.reduce_over_ranks({**extremes, **local}, counts, token_means, float(mask.sum()))
    family, verdict = settings.reward_family
    labels, p_maj, majority_correct, oracle = step_metrics.global_label_metrics(
        scored.rewards, scored.contexts, rollout.records, oracle_named=recipe.reward.oracle is not None, family=family,
        verdict_key=None if verdict is None else recipe.reward.terms[verdict].metric_name)
    metrics.update(labels)
    metrics["actor/optimizer_steps_per_rollout"] = float(settings.optimizer_steps_per_rollout)
    metrics.update(rollout.sampling_metrics)  # dynamic_sampling/*, already global
    metrics.update(scored.advantage_metrics)  # algorithm.advantage_shaping's, already global
    tracked = recipe.dynamics.track_prompts
    prompt_rows = [] if tracked is None else tracking.gather_rows(tracking.rollout_rows(
        step, rollout.records, [ctx.voters for ctx in scored.contexts], p_maj, majority_correct,
        scored.rewards.total, oracle, tracked))
    return metrics, prompt_rows


def _completions(rollout: Rollout, scored: Scored, how_many: int, step: int) -> list[dict]:
    out, rewards = [], scored.rewards
    for index, (group, record, ctx) in enumerate(zip(rollout.groups, rollout.records, scored.contexts)):
        for j, sample in enumerate(group.samples):
            if len(out) >= how_many:
                return out
            out.append({
                "step": step, "prompt_id": record.prompt_id, "prompt": record.prompt, "label": record.label,
                "response": sample.text, "answer": ctx.answers[j], "finish_reason": sample.finish_reason,
                "reward": float(rewards.total[index, j]),
                "oracle": None if rewards.oracle is None else float(rewards.oracle[index, j]),
            })
    return out
