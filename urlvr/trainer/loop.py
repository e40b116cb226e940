"""The GRPO loop. `grpo_step` is the whole algorithm for one rollout batch, top to bottom:
rollout -> score (one forward) -> reward -> advantage -> policy-loss updates -> weight sync -> metrics.

Where it departs from the papers it follows, on purpose (docs/step.md):
- On-policy means one optimizer step per rollout batch (Table 7); old log-probs then come from a
  scoring forward over the same micro-batches as the training forward, so the ratio is exactly 1.
  That forward also computes the token statistics the run declared; it runs even when only the
  old log-probs are needed (skipping it then is future work).
- Every aggregation mode uses mini-batch-wide normalisers summed over ranks, so micro-batching and
  the number of ranks change no gradient (verl normalises per micro-batch in some modes).
- Groups never split across ranks; labels reach the loss only through an oracle reward the recipe
  names as a term, never through `reward.oracle` (metrics only).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace

import torch

from urlvr.metrics import dynamics, tracking
from urlvr.recipe import Recipe
from urlvr.rewards.compose import BatchRewards, RewardTermSpec, score_batch
from urlvr.rewards.policy import EnginePolicy
from urlvr.rewards.base import RewardContext
from urlvr.rollout.base import Group, RolloutBatch, hashed_seed
from urlvr.rollout.collate import collate_groups
from urlvr.algorithms.advantages import ADVANTAGE_ESTIMATORS
from urlvr.trainer.batching import micro_batches
from urlvr.trainer.build import RunParts
from urlvr.trainer.dynamic_sampling import Round, dynamic_sample
from urlvr.dist import DistInfo, all_gather_rows, all_reduce_max, all_reduce_sum
from urlvr.algorithms.losses import KL_ESTIMATORS, token_weights
from urlvr.algorithms.token_filters import TokenFilter, TokenSelection


class StageTimer(dict):
    """Wall time per named stage, reported as `time/<stage>`."""

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self[f"time/{stage}"] = self.get(f"time/{stage}", 0.0) + time.perf_counter() - start


def grpo_step(parts: RunParts, recipe: Recipe, dist: DistInfo, step: int) -> tuple[dict[str, float], list[dict], list[dict]]:
    """One GRPO step on this rank's share of the global batch; returns (metrics, completions,
    per-prompt tracking rows of every rank)."""
    timer, algo, settings = StageTimer(), recipe.algorithm, parts.settings
    step_start = time.perf_counter()

    with timer("rollout"):  # this rank's whole prompts; every group stays on one rank
        sampled = None
        if recipe.rollout.dynamic_sampling.name != "none":  # DAPO: rounds of generate -> reward -> filter (refill)
            sampled = dynamic_sample(parts.stream.next_batch, lambda batch_records, round_index: _sample_round(
                parts, recipe, dist, step, batch_records, round_index), recipe.rollout.dynamic_sampling,
                recipe.trainer.prompts_per_step, dist)
            records, drawn, groups = sampled.records, sampled.drawn, sampled.groups
        else:
            records = parts.stream.next_batch()
            drawn, groups = _generate(parts, recipe, records, settings.train_sampling(step, len(records)))
        batch = _to_device(collate_groups(groups, pad_token_id=parts.tokenizer.pad_token_id), dist.device)
        all_rows = range(batch.input_ids.shape[0])

    with timer("score"):  # ONE forward: old log-probs + exactly the statistics the run declared
        stats = _score(parts, batch, all_rows)
        kl_every = recipe.dynamics.kl_to_initial_every  # KL to pi_0 measured even without a penalty
        measure_kl = algo.kl_coef > 0 or (kl_every > 0 and step % kl_every == 0)
        ref_logprobs = _reference_logprobs(parts, batch, recipe) if measure_kl else None

    with timer("reward"):  # dynamic sampling scored each round's new groups already
        contexts = _contexts(parts, groups, drawn, records, batch, stats)
        rewards = sampled.rewards if sampled is not None else _rewards(
            parts, recipe, step, groups, contexts, settings.first_prompt_index(len(records)))

    with timer("advantage"):  # [B, G] -> one advantage per sample, broadcast over its tokens
        estimator = ADVANTAGE_ESTIMATORS.get(algo.advantage)
        advantages = estimator(rewards.total.double(), eps=algo.advantage_eps).float().flatten().to(dist.device)
        rollout_batch = batch  # metrics describe every sampled row
        if algo.mask_truncated:  # DAPO's overlong filtering: truncated rows leave the update and its normalisers
            batch = _without_truncated(batch, groups)

    with timer("update"):
        parts.engine.offload()  # a vLLM engine frees the device for the actor (sleep mode)
        rows_per_minibatch = settings.rows_per_minibatch
        per_row = {"old_logprobs": stats["logprob"], "advantages": advantages}
        if algo.kl_coef > 0:
            per_row["ref_logprobs"] = ref_logprobs
        # sampler/trainer mismatch correction (algorithm.mismatch), fixed for the step
        correction = algo.mismatch.weights(stats["logprob"], batch.sampler_logprobs, batch.response_mask)
        if correction is not None:
            per_row["is_weights"] = correction.weights
        selected = torch.zeros_like(batch.response_mask, dtype=torch.bool)  # algorithm.token_filter, per mini-batch
        update_log: list[dict[str, float]] = []
        for epoch in range(recipe.trainer.ppo_epochs):
            for mb_start in range(0, len(all_rows), rows_per_minibatch):
                rows = range(mb_start, mb_start + rows_per_minibatch)
                selection = _token_selection(algo.token_filter, batch, stats, advantages, rows, dist,
                                             hashed_seed(recipe.seed, step, epoch, mb_start))
                if selection is not None:
                    selected[mb_start:rows.stop] = selection.selected
                # mini-batch-wide normalisers, summed over ranks: micro-batching changes nothing
                n_tokens, n_seqs = all_reduce_sum(torch.tensor(
                    [float(batch.response_mask[mb_start:rows.stop].sum()), float(len(rows))], dtype=torch.float64
                )).tolist()
                minibatch_loss = 0.0  # this rank's share of the mini-batch's policy loss, x world_size
                for micro in micro_batches(batch, rows, recipe.trainer.micro_batch_size, per_row):
                    loss, policy_loss, log = _micro_batch_loss(parts, micro, dist.world_size, n_seqs, n_tokens,
                                                               None if selection is None else selected[micro["rows"]])
                    parts.actor.backward_and_step(loss)
                    minibatch_loss += policy_loss
                    update_log.append(log)
                # summed over micro-batches here, over ranks by the mean (x world_size) in the metrics
                update_log[-1].update({"loss/policy": minibatch_loss, "actor/grad_norm": parts.actor.grad_norm()})
                if selection is not None:
                    update_log[-1].update({f"actor/token_filter/{k}": v for k, v in selection.metrics.items()})

    with timer("weight_sync"):  # the next rollout (and any evaluation) samples the updated policy
        parts.engine.sync_weights(parts.actor.model)

    with timer("metrics"):
        metrics, prompt_rows = _step_metrics(groups, records, rollout_batch, stats, rewards, contexts, update_log, parts,
                                             timer, recipe, ref_logprobs, step, correction)
        metrics.update(sampled.metrics if sampled is not None else {})  # dynamic_sampling/*, already global
    metrics["time/step"] = time.perf_counter() - step_start
    metrics["perf/tokens_per_second"] = metrics["perf/response_tokens"] / metrics["time/step"]
    completions = _completions(groups, records, rewards, contexts, recipe.logging.completions_per_step, step)
    return metrics, completions, prompt_rows


# --------------------------------------------------------------------------- helpers of the step
def _generate(parts: RunParts, recipe: Recipe, records, sampling) -> tuple[list[Group], list[Group]]:
    """(voting groups, trained groups) of `records`: `vote_group_size` samples drawn, the first
    `group_size` of each trained (TTRL: draw more samples to vote than to train)."""
    group_size = recipe.rollout.group_size
    with parts.generation_context():
        drawn = parts.engine.generate([parts.prompts[r.prompt_id] for r in records],
                                      recipe.reward.vote_group_size or group_size, sampling)
    return drawn, [replace(g, samples=g.samples[:group_size]) for g in drawn]


def _contexts(parts: RunParts, groups, drawn, records, batch: RolloutBatch, stats) -> list[RewardContext]:
    """One reward context per group, lending the rewards' statistics of its rows."""
    settings, group_size = parts.settings, parts.settings.recipe.rollout.group_size
    lent = settings.lent_stats(stats)  # reward.certainty_logits
    return [settings.reward_context(group, voters, record, batch.response_mask[g * group_size:(g + 1) * group_size],
                                    {name: value[g * group_size:(g + 1) * group_size] for name, value in lent.items()},
                                    parts.tokenizer)
            for g, (group, voters, record) in enumerate(zip(groups, drawn, records, strict=True))]


def _rewards(parts: RunParts, recipe: Recipe, step: int, groups, contexts, first_prompt_index: int) -> BatchRewards:
    """The recipe's reward terms (and the metrics-only oracle) over these groups."""
    settings = parts.settings
    terms = [RewardTermSpec(t.name, t.weight, t.kwargs, t.key, t.gate, t.on_error) for t in recipe.reward.terms]
    policy = EnginePolicy(  # lent to rewards that generate (self-verification): one batched call each
        parts.engine, parts.tokenizer, template=recipe.data.template, system_prompt=recipe.data.system_prompt,
        prompt_suffix=recipe.data.prompt_suffix, sampling=settings.policy_sampling(),
        seed=settings.sampling_seed(step, first_prompt_index), generation_context=parts.generation_context)
    return score_batch(groups, contexts, terms, recipe.reward.oracle, policy)


def _sample_round(parts: RunParts, recipe: Recipe, dist: DistInfo, step: int, records, round_index: int) -> Round:
    """One round of dynamic sampling on this rank: generate, score only if a reward reads token
    statistics (the step's scoring pass runs again on the selected groups), reward."""
    settings = parts.settings
    drawn, groups = _generate(parts, recipe, records, settings.round_sampling(step, round_index, len(records)))
    batch = _to_device(collate_groups(groups, pad_token_id=parts.tokenizer.pad_token_id), dist.device)
    stats = _score(parts, batch, range(batch.input_ids.shape[0])) if settings.reward_stats else {}
    contexts = _contexts(parts, groups, drawn, records, batch, stats)
    first = settings.round_first_index(round_index, len(records))
    return Round(records, drawn, groups, contexts, _rewards(parts, recipe, step, groups, contexts, first))


def _to_device(batch: RolloutBatch, device: torch.device) -> RolloutBatch:
    if device.type == "cpu":
        return batch
    return replace(batch, **{k: getattr(batch, k).to(device) for k in
                             ("input_ids", "attention_mask", "response_mask", "sampler_logprobs")})


def _without_truncated(batch: RolloutBatch, groups) -> RolloutBatch:
    """The batch with the response mask of every truncated sample (finish reason `length`) zeroed:
    those rows get no loss weight and no tokens in the normalisers (`algorithm.mask_truncated`)."""
    truncated = torch.tensor([s.finish_reason == "length" for g in groups for s in g.samples],
                             device=batch.response_mask.device)  # [B*G], the batch's row order
    return replace(batch, response_mask=batch.response_mask.masked_fill(truncated.unsqueeze(-1), 0))


def _micro_batch_loss(parts: RunParts, micro: dict, world_size: int, num_sequences: float, num_tokens: float,
                      selected: torch.Tensor | None) -> tuple[torch.Tensor, float, dict[str, float]]:
    """(the micro-batch's loss to backward, its policy-loss share, its metrics): the recipe's loss
    variant (restricted to the `selected` tokens of a token filter, if any) weighted by the
    mini-batch-wide aggregation weights and the mismatch correction, plus the KL and entropy
    terms the recipe turns on."""
    algo, settings = parts.settings.recipe.algorithm, parts.settings
    mask = micro["response_mask"].float()  # [b, T]
    out = parts.actor.forward(micro, settings.train_stats)
    loss_stats = algo.loss.stats()  # current-policy statistics the loss reads, from this forward
    loss_out = algo.loss(out["logprob"], micro["old_logprobs"], micro["advantages"], mask,
                         **({"token_stats": {n: out[n] for n in loss_stats}} if loss_stats else {}))
    per_token_loss = loss_out.per_token_loss  # [b, T]
    if selected is not None:
        per_token_loss = algo.token_filter.apply(per_token_loss, out["logprob"], micro["old_logprobs"], selected)
    # x world_size: DeepSpeed averages gradients over ranks; we want the global sum
    weights = world_size * token_weights(
        mask, algo.loss_aggregation, max_response_length=settings.recipe.rollout.max_new_tokens,
        num_sequences=int(num_sequences), num_tokens=int(num_tokens),
    )  # [b, T]
    policy_weights = weights * micro["is_weights"] if "is_weights" in micro else weights  # algorithm.mismatch
    loss = (policy_weights * per_token_loss).sum()
    policy_loss = loss.item()
    log = {f"actor/{k}": v for k, v in loss_out.metrics.items()}
    if "ref_logprobs" in micro:
        kl = KL_ESTIMATORS.get(algo.kl_estimator)(out["logprob"], micro["ref_logprobs"])  # [b, T]
        loss = loss + algo.kl_coef * (weights * kl).sum()
        log["actor/kl_to_reference"] = dynamics.masked_mean(kl.detach(), mask)
    if algo.entropy_coef > 0:
        loss = loss - algo.entropy_coef * (weights * out["entropy"]).sum()
    return loss, policy_loss, log


def _score(parts: RunParts, batch: RolloutBatch, rows: range) -> dict[str, torch.Tensor]:
    settings = parts.settings  # certainty also on raw logits (same pass) when reward.certainty_logits asks
    micros = micro_batches(batch, rows, settings.recipe.trainer.micro_batch_size)
    pieces = [parts.actor.score(micro, settings.score_stats, settings.raw_score_stats) for micro in micros]
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


def _token_selection(token_filter: TokenFilter, batch: RolloutBatch, stats: dict[str, torch.Tensor],
                     advantages: torch.Tensor, rows: range, dist: DistInfo, seed: int) -> TokenSelection | None:
    """The token filter's selection over the WHOLE mini-batch (every rank's rows, gathered, padded to
    the longest response), so neither micro-batching nor the number of ranks changes it; this rank's rows."""
    if token_filter.name == "none":
        return None
    width = batch.response_mask.shape[1]
    longest = int(all_reduce_max(torch.tensor([width], dtype=torch.float64)))

    def gathered(values: torch.Tensor) -> torch.Tensor:  # [rows, T] -> [world * rows, T_max]
        return all_gather_rows(torch.nn.functional.pad(values[rows.start:rows.stop], (0, longest - width)))

    names = token_filter.stats()
    selection = token_filter.select(
        gathered(stats["logprob"]), all_gather_rows(advantages[rows.start:rows.stop]),
        gathered(batch.response_mask), {n: gathered(stats[n]) for n in names},
        torch.Generator().manual_seed(seed))
    first = dist.rank * len(rows)
    return TokenSelection(selection.selected[first:first + len(rows), :width], selection.metrics)


def _reward_term_metrics(rewards: BatchRewards) -> dict[str, float]:
    """Per-term error rates (on_error: zero) and the means of the terms' diagnostics."""
    out = {f"reward/{key}/error_rate": rate for key, rate in rewards.errors.items()}
    for key, values in rewards.diagnostics.items():
        finite = values[torch.isfinite(values)]
        out[f"reward/{key}_mean"] = float(finite.mean()) if finite.numel() else 0.0
    return out


def _step_metrics(groups, records, batch, stats, rewards: BatchRewards, contexts, update_log, parts: RunParts,
                  timer: StageTimer, recipe: Recipe, ref_logprobs, step: int, correction) -> tuple[dict[str, float], list[dict]]:
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
        **(correction.sequence_means if correction is not None else {}),  # equal rows per rank: plain mean
    }
    token_means = {  # ranks hold different token counts: weight each rank's mean by its count
        **{f"actor/{name}_mean": dynamics.masked_mean(stats[name], mask) for name in parts.settings.metric_stats},
        **dynamics.sampler_mismatch_metrics(stats["logprob"], batch.sampler_logprobs, mask),
        **(correction.token_means if correction is not None else {}),
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
    family, verdict = parts.settings.reward_family
    judged = total if verdict is None else all_gather_rows(rewards.per_term[recipe.reward.terms[verdict].key])
    metrics.update(dynamics.label_metrics(
        judged, None if oracle is None else all_gather_rows(oracle), all_gather_rows(majority_correct), family=family))
    metrics.update(dynamics.reward_metrics(total, {name: all_gather_rows(s) for name, s in rewards.per_term.items()}))
    metrics["actor/lr"] = parts.actor.learning_rate()
    metrics["actor/optimizer_steps_per_rollout"] = float(parts.settings.minibatches_per_step * recipe.trainer.ppo_epochs)
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
