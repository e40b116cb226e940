"""The GRPO loop. `grpo_step` is the whole algorithm for one rollout batch, top to bottom:
rollout -> score (one forward) -> reward -> advantage -> clipped-surrogate updates -> metrics.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch

from urlvr.metrics import dynamics
from urlvr.recipe import Recipe
from urlvr.rewards.base import RewardContext
from urlvr.rewards.compose import BatchRewards, RewardTermSpec, score_batch
from urlvr.rewards.extractors import EXTRACTORS
from urlvr.rollout.base import Group, RolloutBatch, SamplingParams
from urlvr.rollout.collate import collate_groups
from urlvr.trainer.actor import SCORE_STATS
from urlvr.trainer.advantages import ADVANTAGE_ESTIMATORS
from urlvr.trainer.batching import micro_batches
from urlvr.trainer.build import RunParts
from urlvr.trainer.distributed import DistInfo, all_reduce_max, all_reduce_sum
from urlvr.trainer.losses import KL_ESTIMATORS, POLICY_LOSSES, policy_loss_metrics, token_weights


class StageTimer(dict):
    """Wall time per named stage, reported as `time/<stage>`."""

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self[f"time/{stage}"] = self.get(f"time/{stage}", 0.0) + time.perf_counter() - start


def sampling_seed(recipe_seed: int, step: int, rank: int) -> int:
    """A per-(step, rank) seed: rollouts are reproducible and resume-exact without RNG replay."""
    return (recipe_seed * 1_000_003 + step * 7_919 + rank) % (2**62)


def grpo_step(parts: RunParts, recipe: Recipe, dist: DistInfo, step: int) -> tuple[dict[str, float], list[dict]]:
    """One GRPO step on this rank's share of the global batch; returns (metrics, completions)."""
    timer, algo, group_size = StageTimer(), recipe.algorithm, recipe.rollout.group_size
    step_start = time.perf_counter()

    with timer("rollout"):  # this rank's whole prompts; every group stays on one rank
        records = parts.stream.next_batch()
        sampling = SamplingParams(
            temperature=recipe.rollout.temperature, top_p=recipe.rollout.top_p, top_k=recipe.rollout.top_k,
            max_new_tokens=recipe.rollout.max_new_tokens, stop_token_ids=tuple(recipe.rollout.stop_token_ids),
            seed=sampling_seed(recipe.seed, step, dist.rank),
        )
        with parts.actor.generation_context():
            groups = parts.engine.generate([parts.prompts[r.prompt_id] for r in records], group_size, sampling)
        batch = _to_device(collate_groups(groups, pad_token_id=parts.tokenizer.pad_token_id), dist.device)
        all_rows = range(batch.input_ids.shape[0])

    with timer("score"):  # ONE forward: old log-probs for the update + token stats for rewards
        stats = _score(parts, batch, all_rows, recipe.trainer.micro_batch_size)
        ref_logprobs = _reference_logprobs(parts, batch, recipe) if algo.kl_coef > 0 else None

    with timer("reward"):
        contexts = _reward_contexts(groups, records, batch, stats, recipe.reward.extractor)
        terms = [RewardTermSpec(t.name, t.weight, t.kwargs) for t in recipe.reward.terms]
        rewards = score_batch(groups, contexts, terms, recipe.reward.oracle)

    with timer("advantage"):  # [B, G] -> one advantage per sample, broadcast over its tokens
        estimator = ADVANTAGE_ESTIMATORS.get(algo.advantage)
        advantages = estimator(rewards.total.double(), eps=algo.advantage_eps).float().flatten().to(dist.device)

    with timer("update"):
        policy_loss = POLICY_LOSSES.get(algo.loss)
        rows_per_minibatch = recipe.trainer.prompts_per_minibatch // dist.world_size * group_size
        per_row = {"old_logprobs": stats["logprob"], "advantages": advantages}
        if ref_logprobs is not None:
            per_row["ref_logprobs"] = ref_logprobs
        update_log: list[dict[str, float]] = []
        for _epoch in range(recipe.trainer.ppo_epochs):
            for mb_start in range(0, len(all_rows), rows_per_minibatch):
                rows = range(mb_start, mb_start + rows_per_minibatch)
                # mini-batch-wide normalisers, summed over ranks: micro-batching changes nothing
                n_tokens, n_seqs = all_reduce_sum(torch.tensor(
                    [float(batch.response_mask[mb_start:rows.stop].sum()), float(len(rows))], dtype=torch.float64
                )).tolist()
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
                    loss = (weights * loss_out.per_token_loss).sum()
                    log = {"loss/policy": loss.item() / dist.world_size,
                           **{f"actor/{k}": v for k, v in policy_loss_metrics(loss_out, mask).items()}}
                    if "ref_logprobs" in micro:
                        kl = KL_ESTIMATORS.get(algo.kl_estimator)(out["logprob"], micro["ref_logprobs"])
                        loss = loss + algo.kl_coef * (weights * kl).sum()
                        log["actor/kl_to_reference"] = dynamics.masked_mean(kl.detach(), mask)
                    if algo.entropy_coef > 0:
                        loss = loss - algo.entropy_coef * (weights * out["entropy"]).sum()
                    parts.actor.backward_and_step(loss)
                    update_log.append(log)
                update_log[-1]["actor/grad_norm"] = parts.actor.grad_norm()

    with timer("metrics"):
        metrics = _step_metrics(groups, records, batch, stats, rewards, contexts, update_log, parts, timer)
    metrics["time/step"] = time.perf_counter() - step_start
    metrics["perf/tokens_per_second"] = metrics["perf/response_tokens"] / metrics["time/step"]
    completions = _completions(groups, records, rewards, contexts, recipe.logging.completions_per_step, step)
    return metrics, completions


# --------------------------------------------------------------------------- helpers of the step
def _to_device(batch: RolloutBatch, device: torch.device) -> RolloutBatch:
    if device.type == "cpu":
        return batch
    return replace(batch, **{k: getattr(batch, k).to(device) for k in
                             ("input_ids", "attention_mask", "response_mask", "sampler_logprobs")})


def _score(parts: RunParts, batch: RolloutBatch, rows: range, micro_batch_size: int) -> dict[str, torch.Tensor]:
    pieces = [parts.actor.score(micro, SCORE_STATS) for micro in micro_batches(batch, rows, micro_batch_size)]
    return {name: torch.cat([p[name] for p in pieces]) for name in SCORE_STATS}


@torch.no_grad()
def _reference_logprobs(parts: RunParts, batch: RolloutBatch, recipe: Recipe) -> torch.Tensor:
    pieces = []
    for micro in micro_batches(batch, range(batch.input_ids.shape[0]), recipe.trainer.micro_batch_size):
        pieces.append(parts.reference(micro["input_ids"], micro["attention_mask"], micro["position_ids"],
                                      micro["prompt_length"], recipe.rollout.temperature, ("logprob",))["logprob"])
    return torch.cat(pieces)


def _reward_contexts(groups: Sequence[Group], records, batch: RolloutBatch, stats, extractor_name: str) -> list[RewardContext]:
    extract = EXTRACTORS.get(extractor_name)
    contexts = []
    for index, (group, record) in enumerate(zip(groups, records, strict=True)):
        rows = slice(index * group.size, (index + 1) * group.size)
        contexts.append(RewardContext(
            answers=tuple(extract(s.text) for s in group.samples),
            response_mask=batch.response_mask[rows],
            token_stats={name: value[rows] for name, value in stats.items()},
            extract_answer=extract, metadata=record.metadata, _label=record.label,
        ))
    return contexts


def _step_metrics(groups, records, batch, stats, rewards: BatchRewards, contexts, update_log, parts: RunParts,
                  timer: StageTimer) -> dict[str, float]:
    mask = batch.response_mask.float()
    answers = [ctx.answers for ctx in contexts]
    local = {
        **dynamics.response_metrics(groups),
        **dynamics.reward_metrics(rewards.total, rewards.per_term),
        **dynamics.label_metrics(answers, [r.label for r in records], rewards.total, rewards.oracle),
        "dynamics/majority_ratio": dynamics.majority_ratio(answers),
        "dynamics/answer_rate": sum(a is not None for group in answers for a in group) / mask.shape[0],
        "actor/entropy_mean": dynamics.masked_mean(stats["entropy"], mask),
        "actor/self_certainty_mean": dynamics.masked_mean(stats["self_certainty"], mask),
        "actor/sampler_logprob_abs_diff_mean": dynamics.masked_mean((stats["logprob"] - batch.sampler_logprobs).abs(), mask),
        **{k: sum(u[k] for u in update_log if k in u) / max(1, sum(k in u for u in update_log))
           for k in {k for u in update_log for k in u}},
        **timer,
    }
    metrics = _reduce_over_ranks(local)
    metrics["perf/response_tokens"] = float(all_reduce_sum(mask.sum().double()))
    metrics["actor/lr"] = parts.actor.learning_rate()
    metrics["actor/optimizer_steps_per_rollout"] = float(parts.minibatches_per_step * parts.actor.recipe.trainer.ppo_epochs)
    return metrics


def _reduce_over_ranks(local: dict[str, float]) -> dict[str, float]:
    """Mean over ranks (equal shards), max for `*_max` keys; keys present on all ranks."""
    keys = sorted(local)
    values = torch.tensor([local[k] for k in keys], dtype=torch.float64)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    means = all_reduce_sum(values) / world
    maxima = all_reduce_max(values)
    return {k: float(maxima[i] if k.endswith("_max") else means[i]) for i, k in enumerate(keys)}


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
