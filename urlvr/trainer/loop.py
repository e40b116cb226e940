"""The GRPO loop. `grpo_step` is the whole algorithm for one rollout batch, top to bottom:
rollout -> score (a forward, only when needed) -> reward -> advantage -> policy-loss updates
-> weight sync -> metrics.

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

import time
from contextlib import contextmanager
from dataclasses import replace

import torch

from urlvr.metrics import dynamics, step as step_metrics, tracking
from urlvr.recipe import Recipe
from urlvr.rewards.compose import BatchRewards, RewardTermSpec, score_batch
from urlvr.rewards.policy import EnginePolicy
from urlvr.rewards.base import RewardContext
from urlvr.rollout.base import Group, RolloutBatch, hashed_seed
from urlvr.rollout.collate import collate_groups
from urlvr.algorithms.advantages import ADVANTAGE_ESTIMATORS
from urlvr.trainer.batching import (MicroBatch, RowInputs, micro_batches, padding_summary, same_count_on_every_rank,
                                    scatter_rows, scorer_inputs)
from urlvr.trainer.build import RunParts
from urlvr.trainer.dynamic_sampling import Round, dynamic_sample
from urlvr.trainer.sharding import RowLayout
from urlvr.dist import DistInfo, all_gather_objects, all_gather_rows, all_reduce_sum
from urlvr.algorithms.losses import KL_ESTIMATORS, token_weights
from urlvr.algorithms.mismatch import MismatchCorrection
from urlvr.algorithms.token_filters import TokenFilter, TokenSelection


class StageTimer(dict):
    """Wall time per named stage, reported as `time/<stage>`."""

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        yield
        self[f"time/{stage}"] = self.get(f"time/{stage}", 0.0) + time.perf_counter() - start


def grpo_step(parts: RunParts, recipe: Recipe, dist: DistInfo, step: int) -> tuple[dict[str, float], list[dict], list[dict]]:
    """One GRPO step: this rank's whole groups for rollout, rewards and advantages, its even share
    of every mini-batch's rows for the update; returns (metrics, completions, per-prompt tracking
    rows of every rank)."""
    timer, algo, group_size, settings = StageTimer(), recipe.algorithm, recipe.rollout.group_size, parts.settings
    layout = settings.layout
    step_start = time.perf_counter()

    with timer("rollout"):  # this rank's whole prompts; every group stays on one rank
        sampled = None
        if recipe.rollout.dynamic_sampling.name != "none":  # DAPO: rounds of generate -> reward -> filter (refill)
            sampled = dynamic_sample(parts.stream.next_batch, lambda batch_records, round_index: _sample_round(
                parts, recipe, dist, step, batch_records, round_index), recipe.rollout.dynamic_sampling,
                recipe.trainer.prompts_per_step, settings.prompts_per_round, dist)
            records, drawn, groups = sampled.records, sampled.drawn, sampled.groups
        else:
            records = parts.stream.next_batch()
            drawn, groups = _generate(parts, recipe, records, settings.train_sampling(step, len(records)))
        # every rank collates the global batch, as one process would, and scores and trains its rows of it
        every_group = all_gather_objects(groups)
        batch = _to_device(collate_groups(every_group, pad_token_id=parts.tokenizer.pad_token_id), dist.device)
        own = slice(settings.prompt_shard.start * group_size, settings.prompt_shard.stop * group_size)  # our groups' rows
        truncated = _truncated_rows(every_group, batch) if algo.mask_truncated else None  # [B*G] bool

    with timer("score"):  # old log-probs + exactly the declared statistics ([B*G, T] each); else the training forward gives them
        stats = _score(parts, batch) if settings.scoring_pass else None
        kl_every = recipe.dynamics.kl_to_initial_every  # KL to pi_0 measured even without a penalty
        measure_kl = algo.kl_coef > 0 or (kl_every > 0 and step % kl_every == 0)
        ref_logprobs = _reference_logprobs(parts, batch, recipe) if measure_kl else None
        # no scoring pass, and the update will mask rows (mask_truncated): their training forward
        # computes nothing, while the metrics describe every sampled token: score those rows now
        masked_stats = _score_masked_rows(parts, batch, truncated) \
            if not settings.scoring_pass and truncated is not None and truncated.any() else None

    with timer("reward"):  # dynamic sampling scored each round's new groups already
        lent = {name: value[own] for name, value in settings.lent_stats(stats).items()}  # reward.certainty_logits
        contexts = _contexts(parts, groups, drawn, records, batch.response_mask[own], lent)
        rewards = sampled.rewards if sampled is not None else _rewards(
            parts, recipe, step, groups, contexts, settings.first_prompt_index())

    with timer("advantage"):  # [B, G] -> one advantage per sample, broadcast over its tokens; every rank's
        estimator = ADVANTAGE_ESTIMATORS.get(algo.advantage)
        advantages = all_gather_rows(estimator(rewards.total.double(), eps=algo.advantage_eps).float().flatten())
        advantages = advantages.to(dist.device)  # [B*G] of the global batch
        rollout_batch = batch  # metrics describe every sampled row
        if truncated is not None:  # DAPO's overlong filtering: truncated rows leave the update and its normalisers
            batch = _without_rows(batch, truncated)

    with timer("update"):
        parts.engine.offload()  # a vLLM engine frees the device for the actor (sleep mode)
        # sampler/trainer mismatch correction (algorithm.mismatch), fixed for the step by the scoring pass;
        # else each micro-batch's own forward gives the old log-probs and the weights (MicroBatch.old_policy)
        correction = algo.mismatch.weights(stats["logprob"], batch.sampler_logprobs, batch.response_mask) \
            if settings.scoring_pass else None
        inputs = RowInputs(  # rows of the global batch
            advantages=advantages, sampler_logprobs=batch.sampler_logprobs,
            old_logprobs=stats["logprob"] if settings.scoring_pass else None,
            is_weights=None if correction is None else correction.weights,
            ref_logprobs=ref_logprobs if algo.kl_coef > 0 else None)
        selected = torch.zeros_like(batch.response_mask, dtype=torch.bool)  # algorithm.token_filter, per mini-batch
        micro_logs: list[tuple[dict[str, float], int]] = []  # (metrics, its real tokens) per real micro-batch
        step_logs: list[tuple[dict[str, float], int]] = []  # one per optimizer step
        forwards, trained = [], []  # every training forward; (micro, detached statistics) standing in for the scoring pass
        for epoch in range(recipe.trainer.ppo_epochs):
            for mb_start in range(0, layout.rows, layout.rows_per_minibatch):
                minibatch = range(mb_start, mb_start + layout.rows_per_minibatch)  # every rank's rows
                selection = _token_selection(algo.token_filter, batch, stats, advantages, minibatch,
                                             hashed_seed(recipe.seed, step, epoch, mb_start))
                if selection is not None:
                    selected[minibatch.start:minibatch.stop] = selection.selected
                # mini-batch-wide normalisers over all ranks' rows: micro-batching and sharding change nothing
                n_tokens = float(batch.response_mask[minibatch.start:minibatch.stop].sum())
                n_seqs = float(layout.rows_per_minibatch)
                minibatch_loss = 0.0  # this rank's share of the mini-batch's policy loss, x world_size
                lr = parts.actor.learning_rate()  # the rate this optimizer step uses (the scheduler moves on after it)
                rows = layout.minibatch_rows(mb_start)  # this rank's even share of the mini-batch
                # the selection is a [B, T] tensor like every per-row one: cut to each micro-batch's rows AND width
                cut = inputs if selection is None else replace(inputs, selected=selected)
                micros = _micro_batches_on_every_rank(batch, rows, recipe.trainer, cut)
                for i, micro in enumerate(micros):
                    loss, policy_loss, log, out = _micro_batch_loss(parts, micro, dist.world_size, n_seqs, n_tokens)
                    last = i == len(micros) - 1
                    parts.actor.backward_and_step(loss * 0.0 if micro.dummy else loss, last_of_minibatch=last)
                    forwards.append(micro)
                    if micro.dummy:
                        continue
                    minibatch_loss += policy_loss
                    micro_logs.append((log, int(micro.response_mask.sum())))
                    trained.append((micro, out))
                # summed over micro-batches here, over ranks by the mean (x world_size) in the metrics
                step_log = {"loss/policy": minibatch_loss, "actor/grad_norm": parts.actor.grad_norm(), "actor/lr": lr}
                if selection is not None:  # the same on every rank: selected over the whole mini-batch
                    step_log.update({f"actor/token_filter/{k}": v for k, v in selection.metrics.items()})
                step_logs.append((step_log, 1))
        step_logs.append((padding_summary(forwards), 1))  # the only entry with these keys
        if not settings.scoring_pass:  # on-policy, one pass over every row: the training forwards' statistics, every rank's
            stats = _gather_rows(scatter_rows(trained, *batch.response_mask.shape), layout,
                                 [*settings.train_stats, *settings.logged_train_stats], batch)
            if masked_stats is not None:  # rows the update masked: their statistics from before it
                stats = {name: torch.where(truncated.unsqueeze(-1), masked_stats[name], value)
                         for name, value in stats.items()}
            # the same weights the micro-batches used (each row's depends on that row only), for the metrics
            correction = algo.mismatch.weights(stats["logprob"], batch.sampler_logprobs, batch.response_mask)

    with timer("weight_sync"):  # the next rollout (and any evaluation) samples the updated policy
        parts.engine.sync_weights(parts.actor.model)

    with timer("metrics"):
        metrics, prompt_rows = _step_metrics(groups, records, rollout_batch, own, stats, rewards, contexts,
                                             micro_logs + step_logs, parts, timer, ref_logprobs, step, correction)
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


def _contexts(parts: RunParts, groups, drawn, records, response_mask: torch.Tensor,
              lent: dict[str, torch.Tensor]) -> list[RewardContext]:
    """One reward context per group, lending the rewards' statistics of its rows (`response_mask`
    and `lent` hold these groups' rows, in order)."""
    settings, group_size = parts.settings, parts.settings.recipe.rollout.group_size
    return [settings.reward_context(group, voters, record, response_mask[g * group_size:(g + 1) * group_size],
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
    """One round of dynamic sampling on this rank: generate, score its own new groups only if a
    reward reads token statistics (the step's scoring pass runs again on the selected groups), reward."""
    settings = parts.settings
    drawn, groups = _generate(parts, recipe, records, settings.round_sampling(step, round_index, len(records)))
    batch = _to_device(collate_groups(groups, pad_token_id=parts.tokenizer.pad_token_id), dist.device)
    stats = _score_rows(parts, batch, range(batch.input_ids.shape[0])) if settings.reward_stats else {}
    contexts = _contexts(parts, groups, drawn, records, batch.response_mask, settings.lent_stats(stats) if stats else {})
    first = settings.round_first_index(round_index)
    return Round(records, drawn, groups, contexts, _rewards(parts, recipe, step, groups, contexts, first))


def _truncated_rows(groups, batch: RolloutBatch) -> torch.Tensor:
    """`[B*G]` bool in the batch's row order: the samples whose finish reason is `length`.
    `algorithm.mask_truncated` zeroes their response mask for the update (no loss weight, no
    tokens in the normalisers); the metrics still describe them."""
    return torch.tensor([s.finish_reason == "length" for g in groups for s in g.samples],
                        device=batch.response_mask.device)


def _without_rows(batch: RolloutBatch, rows: torch.Tensor) -> RolloutBatch:
    """The batch with the response mask of `rows` (`[B*G]` bool) zeroed."""
    return replace(batch, response_mask=batch.response_mask.masked_fill(rows.unsqueeze(-1), 0))


def _score_masked_rows(parts: RunParts, batch: RolloutBatch, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics the training forwards compute (`[B*G, T]` each, every rank's rows), measured
    by a no-grad forward of the rollout's policy over `rows` (`[B*G]` bool), zero elsewhere. Why:
    the training forward of a row the update masks (`mask_truncated`) computes nothing for it, and
    the metrics (entropy, sampler mismatch, KL to pi_0, the collapse detectors) describe every
    sampled token, not only the trained ones. Only these rows pay a forward, and no backward."""
    settings = parts.settings
    layout, names = settings.layout, (*settings.train_stats, *settings.logged_train_stats)
    own = [row for run in layout.scored_rows() for row in run if rows[row]]  # this rank's share of them
    return _gather_rows(_score_rows(parts, batch, own, names, ()), layout, names, batch)


def _to_device(batch: RolloutBatch, device: torch.device) -> RolloutBatch:
    if device.type == "cpu":
        return batch
    return replace(batch, **{k: getattr(batch, k).to(device) for k in
                             ("input_ids", "attention_mask", "response_mask", "sampler_logprobs")})


def _micro_batch_loss(parts: RunParts, micro: MicroBatch, world_size: int, num_sequences: float, num_tokens: float,
                      ) -> tuple[torch.Tensor, float, dict[str, float], dict[str, torch.Tensor]]:
    """(the micro-batch's loss to backward, its policy-loss share, its metrics, its forward's
    statistics detached): the recipe's loss variant (restricted to the tokens a token filter
    selected, if any) weighted by the mini-batch-wide aggregation weights and the mismatch
    correction, plus the KL and entropy terms the recipe turns on."""
    algo, settings = parts.settings.recipe.algorithm, parts.settings
    mask = micro.response_mask.float()  # [b, T]
    out = parts.actor.forward(micro, settings.train_stats, detached_stats=settings.logged_train_stats)
    micro = _old_policy(micro, out["logprob"], algo.mismatch)
    loss_stats = algo.loss.stats()  # current-policy statistics the loss reads, from this forward
    loss_out = algo.loss(out["logprob"], micro.old_logprobs, micro.advantages, mask,
                         **({"token_stats": {n: out[n] for n in loss_stats}} if loss_stats else {}))
    per_token_loss = loss_out.per_token_loss  # [b, T]
    if micro.selected is not None:
        per_token_loss = algo.token_filter.apply(per_token_loss, out["logprob"], micro.old_logprobs, micro.selected)
    # x world_size: DeepSpeed averages gradients over ranks; we want the global sum
    weights = world_size * token_weights(
        mask, algo.loss_aggregation, max_response_length=settings.recipe.rollout.max_new_tokens,
        num_sequences=int(num_sequences), num_tokens=int(num_tokens),
    )  # [b, T]
    policy_weights = weights if micro.is_weights is None else weights * micro.is_weights
    loss = (policy_weights * per_token_loss).sum()
    policy_loss = loss.item()
    log = {f"actor/{k}": v for k, v in loss_out.metrics.items()}
    if micro.ref_logprobs is not None:
        kl = KL_ESTIMATORS.get(algo.kl_estimator)(out["logprob"], micro.ref_logprobs)  # [b, T]
        loss = loss + algo.kl_coef * (weights * kl).sum()
        log["actor/kl_to_reference"] = dynamics.masked_mean(kl.detach(), mask)
    if algo.entropy_coef > 0:
        loss = loss - algo.entropy_coef * (weights * out["entropy"]).sum()
    return loss, policy_loss, log, {name: value.detach() for name, value in out.items()}


def _old_policy(micro: MicroBatch, logprob: torch.Tensor, mismatch: MismatchCorrection) -> MicroBatch:
    """`micro` with its old log-probs and mismatch weights: the scoring pass's when it ran, else
    those of this very training forward (`logprob`, detached: the policy that sampled, ratio
    exactly 1) and the weights they give, which are the scoring pass's (each row's weight depends
    on that row only)."""
    if micro.old_logprobs is not None:
        return micro
    correction = mismatch.weights(logprob.detach(), micro.sampler_logprobs, micro.response_mask)
    return replace(micro, old_logprobs=logprob.detach(), is_weights=None if correction is None else correction.weights)


def _micro_batches_on_every_rank(batch: RolloutBatch, rows, trainer, inputs: RowInputs = RowInputs()) -> list[MicroBatch]:
    """This rank's micro-batches of `rows`, padded with dummies to the count of the rank with the
    most (ZeRO needs equal forward/backward calls); a rank with no rows runs dummies only."""
    micros = micro_batches(batch, rows, trainer, inputs) if len(rows) else \
        [replace(micro_batches(batch, [0], trainer, inputs)[0], dummy=True)]
    return same_count_on_every_rank(micros)


def _gather_rows(local: dict[str, torch.Tensor], layout: RowLayout, names, batch: RolloutBatch) -> dict[str, torch.Tensor]:
    """Every rank's rows of the `[B*G, T]` statistics `names` (`local` holds zeros where another
    rank computed the row, and may lack a name on a rank that had no rows): each row is computed
    by exactly one rank, so a sum over ranks puts every row in place, exactly."""
    if layout.world_size == 1:
        return local
    return {name: all_reduce_sum(local[name] if name in local else torch.zeros_like(batch.sampler_logprobs))
            for name in names}


def _score_rows(parts: RunParts, batch: RolloutBatch, rows, stats: tuple[str, ...] | None = None,
                raw_stats: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The scoring pass over `rows` of `batch`: `stats` (default: the run's declared scoring
    statistics, and certainty also on raw logits when reward.certainty_logits asks), `[B*G, T]`
    each, zero on the other rows. Every rank calls it (with no rows: dummy forwards only)."""
    settings = parts.settings
    stats = settings.score_stats if stats is None else stats
    raw_stats = settings.raw_score_stats if raw_stats is None else raw_stats
    micros = _micro_batches_on_every_rank(batch, rows, settings.recipe.trainer)
    pieces = [(micro, parts.actor.score(micro, stats, raw_stats)) for micro in micros]
    return scatter_rows([(micro, out) for micro, out in pieces if not micro.dummy], *batch.response_mask.shape)


def _score(parts: RunParts, batch: RolloutBatch) -> dict[str, torch.Tensor]:
    """Each rank scores its rows of the global batch; the rows are then gathered, so every rank
    holds every row's statistics."""
    settings, layout = parts.settings, parts.settings.layout
    local = _score_rows(parts, batch, [row for run in layout.scored_rows() for row in run])
    return _gather_rows(local, layout, [*settings.score_stats, *(f"raw_{n}" for n in settings.raw_score_stats)], batch)


@torch.no_grad()
def _reference_logprobs(parts: RunParts, batch: RolloutBatch, recipe: Recipe) -> torch.Tensor:
    """pi_0's log-probs of every row: each rank its scored rows, then gathered (no dummies: the
    reference is a plain module, no collectives)."""
    layout, pieces = parts.settings.layout, []
    rows = [row for run in layout.scored_rows() for row in run]
    device = next(parts.reference.parameters()).device  # the training device, or the host (dynamics.kl_reference_device)
    for micro in (micro_batches(batch, rows, recipe.trainer) if rows else []):
        logprob = parts.reference(**scorer_inputs(micro, device), temperature=recipe.rollout.temperature,
                                  stats=("logprob",))["logprob"]
        pieces.append((micro, {"logprob": logprob.to(batch.input_ids.device)}))
    local = scatter_rows(pieces, *batch.response_mask.shape) or {"logprob": torch.zeros_like(batch.sampler_logprobs)}
    return _gather_rows(local, layout, ["logprob"], batch)["logprob"]


def _token_selection(token_filter: TokenFilter, batch: RolloutBatch, stats: dict[str, torch.Tensor],
                     advantages: torch.Tensor, minibatch: range, seed: int) -> TokenSelection | None:
    """The token filter's selection over the WHOLE mini-batch (every rank holds every row), so
    neither micro-batching nor the number of ranks changes it."""
    if token_filter.name == "none":
        return None
    rows = slice(minibatch.start, minibatch.stop)
    return token_filter.select(stats["logprob"][rows], advantages[rows], batch.response_mask[rows],
                               {n: stats[n][rows] for n in token_filter.stats()}, torch.Generator().manual_seed(seed))


def _step_metrics(groups, records, batch: RolloutBatch, own: slice, stats, rewards: BatchRewards, contexts,
                  update_logs, parts: RunParts, timer: StageTimer, ref_logprobs, step: int,
                  correction) -> tuple[dict[str, float], list[dict]]:
    """Each rank measures its own groups (rows `own` of the global batch); metrics/step.py reduces them."""
    settings = parts.settings
    recipe, mask = settings.recipe, batch.response_mask[own].float()
    local, counts = step_metrics.rank_metrics(groups, contexts, rewards, mask, update_logs, timer, correction,
                                              ngram=recipe.dynamics.repetition_ngram)
    token_means, extremes = step_metrics.token_metrics(
        {name: stats[name][own] for name in ("logprob", *settings.metric_stats)}, batch.sampler_logprobs[own], mask,
        settings.metric_stats, correction, None if ref_logprobs is None else ref_logprobs[own])
    metrics = step_metrics.reduce_over_ranks({**extremes, **local}, counts, token_means, float(mask.sum()))
    family, verdict = settings.reward_family
    labels, p_maj, majority_correct, oracle = step_metrics.global_label_metrics(
        rewards, contexts, records, oracle_named=recipe.reward.oracle is not None, family=family,
        verdict_key=None if verdict is None else recipe.reward.terms[verdict].key)
    metrics.update(labels)
    metrics["actor/optimizer_steps_per_rollout"] = float(settings.minibatches_per_step * recipe.trainer.ppo_epochs)
    tracked = recipe.dynamics.track_prompts
    prompt_rows = [] if tracked is None else tracking.gather_rows(tracking.rollout_rows(
        step, records, [ctx.voters for ctx in contexts], p_maj, majority_correct, rewards.total, oracle, tracked))
    return metrics, prompt_rows


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
