"""The GRPO loop. `grpo_step` is the whole algorithm for one rollout batch, top to bottom:
rollout -> score (one forward) -> reward -> advantage -> clipped-surrogate updates -> metrics.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch

from urlvr.metrics import dynamics, tracking
from urlvr.recipe import Recipe
from urlvr.rewards.base import RewardContext
from urlvr.rewards.compose import BatchRewards, RewardTermSpec, reward_family, score_batch
from urlvr.rewards.extractors import make_extractor
from urlvr.rewards.policy import EnginePolicy
from urlvr.rollout.base import Group, RolloutBatch, SamplingParams, hashed_seed
from urlvr.rollout.collate import collate_groups
from urlvr.trainer.actor import SCORE_STATS
from urlvr.trainer.advantages import ADVANTAGE_ESTIMATORS
from urlvr.trainer.batching import micro_batches
from urlvr.trainer.build import RunParts
from urlvr.trainer.distributed import DistInfo, all_gather_rows, all_reduce_max, all_reduce_sum
from urlvr.trainer.losses import (
    KL_ESTIMATORS,
    POLICY_LOSSES,
    policy_loss_metrics,
    token_weights,
    truncated_importance_weights,
)


class StageTimer(dict):
    """Wall time per named stage, reported as `time/<stage>`."""

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self[f"time/{stage}"] = self.get(f"time/{stage}", 0.0) + time.perf_counter() - start


def sampling_seed(recipe_seed: int, step: int, prompt_index: int) -> int:
    """A per-(step, prompt) seed, keyed by the prompt's index in the global batch: rollouts are
    reproducible, resume-exact without RNG replay, and the same on 1 rank or 8."""
    return hashed_seed(recipe_seed, step, prompt_index, bits=62)


def grpo_step(parts: RunParts, recipe: Recipe, dist: DistInfo, step: int) -> tuple[dict[str, float], list[dict], list[dict]]:
    """One GRPO step on this rank's share of the global batch; returns (metrics, completions,
    per-prompt tracking rows of every rank)."""
    timer, algo, group_size = StageTimer(), recipe.algorithm, recipe.rollout.group_size
    step_start = time.perf_counter()

    with timer("rollout"):  # this rank's whole prompts; every group stays on one rank
        records = parts.stream.next_batch()
        first_index = dist.rank * len(records)  # ranks hold equal contiguous slices of the global batch
        sampling = SamplingParams(
            temperature=recipe.rollout.temperature, top_p=recipe.rollout.top_p, top_k=recipe.rollout.top_k,
            max_new_tokens=recipe.rollout.max_new_tokens, stop_token_ids=tuple(recipe.rollout.stop_token_ids),
            prompt_seeds=tuple(sampling_seed(recipe.seed, step, first_index + i) for i in range(len(records))),
        )
        vote_size = recipe.reward.vote_group_size or group_size  # TTRL: draw more samples to vote than to train
        with parts.generation_context():
            drawn = parts.engine.generate([parts.prompts[r.prompt_id] for r in records], vote_size, sampling)
        groups = [replace(g, samples=g.samples[:group_size]) for g in drawn]  # the first group_size are trained
        batch = _to_device(collate_groups(groups, pad_token_id=parts.tokenizer.pad_token_id), dist.device)
        all_rows = range(batch.input_ids.shape[0])

    with timer("score"):  # ONE forward: old log-probs for the update + token stats for rewards
        stats = _score(parts, batch, all_rows, recipe)
        kl_every = recipe.dynamics.kl_to_initial_every  # KL to pi_0 measured even without a penalty
        measure_kl = algo.kl_coef > 0 or (kl_every > 0 and step % kl_every == 0)
        ref_logprobs = _reference_logprobs(parts, batch, recipe) if measure_kl else None

    with timer("reward"):
        contexts = _reward_contexts(groups, drawn, records, batch, stats, recipe, parts.tokenizer)
        terms = [RewardTermSpec(t.name, t.weight, t.kwargs, t.key, t.gate, t.on_error) for t in recipe.reward.terms]
        policy = EnginePolicy(  # lent to rewards that generate (self-verification): one batched call each
            parts.engine, parts.tokenizer, template=recipe.data.template, system_prompt=recipe.data.system_prompt,
            prompt_suffix=recipe.data.prompt_suffix, sampling=replace(sampling, prompt_seeds=None),
            seed=sampling_seed(recipe.seed, step, first_index), generation_context=parts.generation_context)
        rewards = score_batch(groups, contexts, terms, recipe.reward.oracle, policy)

    with timer("advantage"):  # [B, G] -> one advantage per sample, broadcast over its tokens
        estimator = ADVANTAGE_ESTIMATORS.get(algo.advantage)
        advantages = estimator(rewards.total.double(), eps=algo.advantage_eps).float().flatten().to(dist.device)

    with timer("update"):
        parts.engine.offload()  # a vLLM engine frees the device for the actor (sleep mode)
        policy_loss = POLICY_LOSSES.get(algo.loss)
        rows_per_minibatch = recipe.trainer.prompts_per_minibatch // dist.world_size * group_size
        per_row = {"old_logprobs": stats["logprob"], "advantages": advantages}
        if algo.kl_coef > 0:
            per_row["ref_logprobs"] = ref_logprobs
        if algo.tis_cap is not None:  # sampler/trainer mismatch correction, fixed for the step
            per_row["tis_weights"] = truncated_importance_weights(
                stats["logprob"], batch.sampler_logprobs, batch.response_mask, algo.tis_cap)
        update_log: list[dict[str, float]] = []
        for _epoch in range(recipe.trainer.ppo_epochs):
            for mb_start in range(0, len(all_rows), rows_per_minibatch):
                rows = range(mb_start, mb_start + rows_per_minibatch)
                # mini-batch-wide normalisers, summed over ranks: micro-batching changes nothing
                n_tokens, n_seqs = all_reduce_sum(torch.tensor(
                    [float(batch.response_mask[mb_start:rows.stop].sum()), float(len(rows))], dtype=torch.float64
                )).tolist()
                minibatch_loss = 0.0  # this rank's share of the mini-batch's policy loss, x world_size
                for micro in micro_batches(batch, rows, recipe.trainer.micro_batch_size, per_row):
                    mask = micro["response_mask"].float()
                    wanted = ("logprob", "entropy") if algo.entropy_coef > 0 else ("logprob",)
                    out = parts.actor.forward(micro, wanted)
                    loss_out = policy_loss(
                        out["logprob"], micro["old_logprobs"], micro["advantages"], mask,
                        clip_eps_low=algo.clip_eps_low, clip_eps_high=algo.clip_eps_high, dual_clip_c=algo.dual_clip_c,
                    )
                    # x world_size: DeepSpeed averages gradients over ranks; we want the global sum
                    weights = dist.world_size * token_weights(
                        mask, algo.loss_aggregation, max_response_length=recipe.rollout.max_new_tokens,
                        num_sequences=int(n_seqs), num_tokens=int(n_tokens),
                    )
                    if "tis_weights" in micro:
                        weights = weights * micro["tis_weights"]
                    loss = (weights * loss_out.per_token_loss).sum()
                    minibatch_loss += loss.item()
                    log = {f"actor/{k}": v for k, v in policy_loss_metrics(loss_out, mask).items()}
                    if "ref_logprobs" in micro:
                        kl = KL_ESTIMATORS.get(algo.kl_estimator)(out["logprob"], micro["ref_logprobs"])
                        loss = loss + algo.kl_coef * (weights * kl).sum()
                        log["actor/kl_to_reference"] = dynamics.masked_mean(kl.detach(), mask)
                    if algo.entropy_coef > 0:
                        loss = loss - algo.entropy_coef * (weights * out["entropy"]).sum()
                    parts.actor.backward_and_step(loss)
                    update_log.append(log)
                # summed over micro-batches here, over ranks by the mean (x world_size) in the metrics
                update_log[-1].update({"loss/policy": minibatch_loss, "actor/grad_norm": parts.actor.grad_norm()})

    with timer("weight_sync"):  # the next rollout (and any evaluation) samples the updated policy
        parts.engine.sync_weights(parts.actor.model)

    with timer("metrics"):
        metrics, prompt_rows = _step_metrics(groups, records, batch, stats, rewards, contexts, update_log, parts,
                                             timer, recipe, ref_logprobs, step)
    metrics["time/step"] = time.perf_counter() - step_start
    metrics["perf/tokens_per_second"] = metrics["perf/response_tokens"] / metrics["time/step"]
    completions = _completions(groups, records, rewards, contexts, recipe.logging.completions_per_step, step)
    return metrics, completions, prompt_rows


# --------------------------------------------------------------------------- helpers of the step
def _to_device(batch: RolloutBatch, device: torch.device) -> RolloutBatch:
    if device.type == "cpu":
        return batch
    return replace(batch, **{k: getattr(batch, k).to(device) for k in
                             ("input_ids", "attention_mask", "response_mask", "sampler_logprobs")})


def _score(parts: RunParts, batch: RolloutBatch, rows: range, recipe: Recipe) -> dict[str, torch.Tensor]:
    # certainty measured on raw logits too (same pass) when the recipe asks and it makes a difference
    raw = SCORE_STATS if recipe.reward.certainty_logits == "raw" and recipe.rollout.temperature != 1.0 else ()
    micros = micro_batches(batch, rows, recipe.trainer.micro_batch_size)
    pieces = [parts.actor.score(micro, SCORE_STATS, raw) for micro in micros]
    return {name: torch.cat([p[name] for p in pieces]) for name in pieces[0]}


@torch.no_grad()
def _reference_logprobs(parts: RunParts, batch: RolloutBatch, recipe: Recipe) -> torch.Tensor:
    pieces = []
    device = next(parts.reference.parameters()).device  # the training device, or the host (dynamics.kl_reference_device)
    for micro in micro_batches(batch, range(batch.input_ids.shape[0]), recipe.trainer.micro_batch_size):
        ids, attention, positions = (micro[k].to(device) for k in ("input_ids", "attention_mask", "position_ids"))
        pieces.append(parts.reference(ids, attention, positions, micro["prompt_length"], recipe.rollout.temperature,
                                      ("logprob",))["logprob"].to(batch.input_ids.device))
    return torch.cat(pieces)


def _reward_contexts(groups: Sequence[Group], drawn: Sequence[Group], records, batch: RolloutBatch, stats,
                     recipe: Recipe, tokenizer) -> list[RewardContext]:
    extract = make_extractor(recipe.reward.extractor, recipe.reward.extractor_kwargs)
    lent = {name: stats.get(f"raw_{name}", stats[name]) for name in SCORE_STATS}  # reward.certainty_logits
    contexts = []
    for index, (group, voters, record) in enumerate(zip(groups, drawn, records, strict=True)):
        rows = slice(index * group.size, (index + 1) * group.size)
        answers = tuple(extract(s.text) for s in group.samples)
        extra = tuple(extract(s.text) for s in voters.samples[group.size:])  # voting-only samples
        contexts.append(RewardContext(
            answers=answers, response_mask=batch.response_mask[rows],
            token_stats={name: value[rows] for name, value in lent.items()},
            extract_answer=extract, metadata=record.metadata, _label=record.label, question=record.prompt,
            tokenizer=tokenizer, vote_answers=answers + extra if extra else None,
        ))
    return contexts


def _reward_term_metrics(rewards: BatchRewards) -> dict[str, float]:
    """Per-term error rates (on_error: zero) and the means of the terms' diagnostics."""
    out = {f"reward/{key}/error_rate": rate for key, rate in rewards.errors.items()}
    for key, values in rewards.diagnostics.items():
        finite = values[torch.isfinite(values)]
        out[f"reward/{key}_mean"] = float(finite.mean()) if finite.numel() else 0.0
    return out


def _step_metrics(groups, records, batch, stats, rewards: BatchRewards, contexts, update_log, parts: RunParts,
                  timer: StageTimer, recipe: Recipe, ref_logprobs, step: int) -> tuple[dict[str, float], list[dict]]:
    mask = batch.response_mask.float()
    answers, voters = [ctx.answers for ctx in contexts], [ctx.voters for ctx in contexts]
    mismatch = torch.where(mask.bool(), (stats["logprob"] - batch.sampler_logprobs).abs(), 0.0)
    local = {
        "rollout/logprob_mismatch_max": float(mismatch.max()) if mismatch.numel() else 0.0,
        **dynamics.response_metrics(groups, ngram=recipe.dynamics.repetition_ngram),
        **_reward_term_metrics(rewards),
        "dynamics/answer_rate": sum(a is not None for group in answers for a in group) / mask.shape[0],
        **{k: sum(u[k] for u in update_log if k in u) / max(1, sum(k in u for u in update_log))
           for k in {k for u in update_log for k in u}},
        **timer,
    }
    token_means = {  # ranks hold different token counts: weight each rank's mean by its count
        "actor/entropy_mean": dynamics.masked_mean(stats["entropy"], mask),
        "actor/self_certainty_mean": dynamics.masked_mean(stats["self_certainty"], mask),
        **dynamics.sampler_mismatch_metrics(stats["logprob"], batch.sampler_logprobs, mask, recipe.algorithm.tis_cap),
    }
    if ref_logprobs is not None:  # KL(pi || pi_0) of the policy that sampled this batch
        token_means["actor/kl_to_initial"] = dynamics.masked_mean(dynamics.kl_k3(stats["logprob"], ref_logprobs), mask)
    metrics = _reduce_over_ranks(local, token_means, float(mask.sum()))
    # label metrics and p_maj over the global batch: gather per-sample [B, G] and per-prompt [B] rows
    oracle = rewards.oracle
    if oracle is None and recipe.reward.oracle is not None:  # no label on this rank: NaN rows, same shapes
        oracle = torch.full(rewards.total.shape, float("nan"))
    p_maj = dynamics.majority_ratios(voters)  # [B]
    majority_correct = dynamics.majority_correctness(voters, answers, oracle, [r.label for r in records])  # [B]
    metrics["dynamics/majority_ratio"] = float(all_gather_rows(p_maj).mean())
    # label metrics, std and zero-variance groups need every sample: gather the small [B, G] rewards once
    total = all_gather_rows(rewards.total)
    # each label metric only where the reward's family defines it (Reward Accuracy: verdicts only)
    family, verdict = reward_family([(t.name, t.weight) for t in recipe.reward.terms])
    judged = total if verdict is None else all_gather_rows(rewards.per_term[recipe.reward.terms[verdict].key])
    metrics.update(dynamics.label_metrics(
        judged, None if oracle is None else all_gather_rows(oracle), all_gather_rows(majority_correct), family=family))
    metrics.update(dynamics.reward_metrics(total, {name: all_gather_rows(s) for name, s in rewards.per_term.items()}))
    metrics["actor/lr"] = parts.actor.learning_rate()
    metrics["actor/optimizer_steps_per_rollout"] = float(parts.minibatches_per_step * recipe.trainer.ppo_epochs)
    tracked = recipe.dynamics.track_prompts
    prompt_rows = [] if tracked is None else tracking.gather_rows(tracking.rollout_rows(
        step, records, voters, p_maj, majority_correct, rewards.total, oracle, tracked))
    return metrics, prompt_rows


def _reduce_over_ranks(local: dict[str, float], token_means: dict[str, float], tokens: float) -> dict[str, float]:
    """Mean over ranks (equal shards), max for `*_max` keys, min for `*_min` keys; `token_means`
    are weighted by each rank's `tokens`. Keys present on all ranks. Adds `perf/response_tokens`."""
    keys, weighted = sorted(local), sorted(token_means)
    values = torch.tensor([local[k] for k in keys] + [token_means[k] * tokens for k in weighted] + [tokens],
                          dtype=torch.float64)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    sums, maxima, minima = all_reduce_sum(values), all_reduce_max(values), -all_reduce_max(-values)
    out = {k: float(maxima[i] if k.endswith("_max") else minima[i] if k.endswith("_min") else sums[i] / world)
           for i, k in enumerate(keys)}
    total_tokens = float(sums[-1])
    out.update({k: float(sums[len(keys) + j]) / total_tokens if total_tokens else 0.0 for j, k in enumerate(weighted)})
    out["perf/response_tokens"] = total_tokens
    return out


def _completions(groups, records, rewards: BatchRewards, contexts, how_many: int, step: int) -> list[dict]:
    out = []
    for index, (group, record, ctx) in enumerate(zip(groups, records, contexts)):
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
