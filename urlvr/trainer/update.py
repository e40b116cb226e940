"""The update stage of a GRPO step: `trainer.ppo_epochs` passes of one optimizer step per
mini-batch, each over this rank's `MicroBatch`es of its even share of the mini-batch's rows
(trainer/sharding.py), with mini-batch-wide normalisers summed over ranks, so neither the
micro-batching nor the number of ranks changes a gradient. Returns an `UpdateResult`.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from urlvr.algorithms.losses import KL_ESTIMATORS, token_weights
from urlvr.algorithms.mismatch import MismatchCorrection
from urlvr.algorithms.token_filters import TokenSelection
from urlvr.metrics import dynamics
from urlvr.rollout.base import RolloutBatch
from urlvr.trainer.batching import MicroBatch, RowInputs, padding_summary, scatter_rows
from urlvr.trainer.build import RunParts
from urlvr.trainer.scoring import gather_rows, micro_batches_on_every_rank
from urlvr.trainer.stages import Logs, Rollout, Scored, Stats, UpdateResult


def update_policy(parts: RunParts, rollout: Rollout, scored: Scored, reference: torch.Tensor | None,
                  masked: Stats | None, step: int) -> UpdateResult:
    """`trainer.ppo_epochs` passes of one optimizer step per mini-batch. The old log-probs are the
    scoring pass's, fixed for the step, when it ran; else each micro-batch's own forward gives
    them, and the training forwards' statistics stand in for the scoring pass's in the metrics.
    Either way each micro-batch gets its mismatch weights from its old log-probs (`_old_policy`)."""
    settings, algo, layout = parts.settings, parts.settings.recipe.algorithm, parts.settings.layout
    batch = rollout.batch  # DAPO's overlong filtering: truncated rows leave the update and its normalisers
    batch = batch if rollout.truncated is None else without_rows(batch, rollout.truncated)
    old = scored.stats["logprob"] if settings.scoring_pass else None  # else each training forward's own
    inputs = RowInputs(advantages=scored.advantages, sampler_logprobs=batch.sampler_logprobs, old_logprobs=old,
                       ref_logprobs=reference if settings.kl_penalty else None)  # rows of the global batch
    logs: Logs = []  # (metrics, real tokens) per real micro-batch, (metrics, 1) per optimizer step
    forwards, trained = [], []  # every training forward; (micro, detached statistics) of the real ones
    for epoch in range(settings.recipe.trainer.ppo_epochs):
        for start in range(0, layout.rows, layout.rows_per_minibatch):
            logs += _minibatch_step(parts, batch, inputs, scored.stats, range(start, start + layout.rows_per_minibatch),
                                    settings.token_filter_seed(step, epoch, start), forwards, trained)
    logs.append((padding_summary(forwards), 1))  # the only entry with these keys
    stats = scored.stats if old is not None else _training_stats(parts, batch, trained, rollout.truncated, masked)
    # the mismatch correction of the whole batch, for the metrics: row by row the weights the micro-batches used
    return UpdateResult(stats, algo.mismatch.weights(stats["logprob"], batch.sampler_logprobs, batch.response_mask), logs)


def _training_stats(parts: RunParts, batch: RolloutBatch, trained: list, truncated: torch.Tensor | None,
                    masked: Stats | None) -> Stats:
    """On-policy (no scoring pass), one pass over every row: the training forwards' statistics
    `[B*G, T]`, every rank's, standing in for the scoring pass's; rows the update masked
    (`mask_truncated`) take `masked`, their statistics from before it."""
    settings = parts.settings
    stats = gather_rows(scatter_rows(trained, *batch.response_mask.shape), settings.layout,
                        [*settings.train_stats, *settings.logged_train_stats], batch)
    if masked is None:
        return stats
    return {name: torch.where(truncated.unsqueeze(-1), masked[name], value) for name, value in stats.items()}


def _minibatch_step(parts: RunParts, batch: RolloutBatch, inputs: RowInputs, stats: Stats, minibatch: range,
                    seed: int, forwards: list, trained: list) -> Logs:
    """One optimizer step over `minibatch` (every rank's rows): this rank's micro-batches of its
    even share, each forward and backward, the step at the last; returns their logs."""
    settings, algo = parts.settings, parts.settings.recipe.algorithm
    selection = _token_selection(parts, batch, stats, inputs.advantages, minibatch, seed)
    if selection is not None:  # a [B*G, T] field like every other: cut to each micro-batch's rows AND width
        selected = torch.zeros_like(batch.response_mask, dtype=torch.bool)
        selected[minibatch.start:minibatch.stop] = selection.selected
        inputs = replace(inputs, selected=selected)
    # mini-batch-wide normalisers over all ranks' rows: micro-batching and sharding change nothing
    n_tokens = float(batch.response_mask[minibatch.start:minibatch.stop].sum())
    lr = parts.actor.learning_rate()  # the rate this optimizer step uses (the scheduler moves on after it)
    micros = micro_batches_on_every_rank(parts, batch, settings.layout.minibatch_rows(minibatch.start), inputs)
    logs, minibatch_loss = [], 0.0  # this rank's share of the mini-batch's policy loss, x world_size
    for i, micro in enumerate(micros):
        loss, policy_loss, log, out = _micro_batch_loss(parts, micro, len(minibatch), n_tokens)
        parts.actor.backward_and_step(loss * 0.0 if micro.dummy else loss, last_of_minibatch=i == len(micros) - 1)
        forwards.append(micro)
        if not micro.dummy:
            minibatch_loss += policy_loss
            logs.append((log, int(micro.response_mask.sum())))
            trained.append((micro, out))
    # summed over micro-batches here, over ranks by the mean (x world_size) in the metrics
    step_log = {"loss/policy": minibatch_loss, "actor/grad_norm": parts.actor.grad_norm(), "actor/lr": lr}
    if selection is not None:  # the same on every rank: selected over the whole mini-batch
        step_log.update({f"actor/token_filter/{k}": v for k, v in selection.metrics.items()})
    return logs + [(step_log, 1)]


def _micro_batch_loss(parts: RunParts, micro: MicroBatch, num_sequences: int, num_tokens: float,
                      ) -> tuple[torch.Tensor, float, dict[str, float], dict[str, torch.Tensor]]:
    """(the micro-batch's loss to backward, its policy-loss share, its metrics, its forward's
    statistics detached): the recipe's loss variant (restricted to the tokens a token filter
    selected, if any) weighted by the mini-batch-wide aggregation weights and the mismatch
    correction, plus the KL and entropy terms the recipe turns on."""
    algo, settings = parts.settings.recipe.algorithm, parts.settings
    mask = micro.response_mask.float()  # [b, T]
    out = parts.actor.forward(micro, settings.train_stats, detached_stats=settings.logged_train_stats,
                              temperature=settings.temperature)
    micro = _old_policy(micro, out["logprob"], algo.mismatch)
    loss_stats = algo.loss.stats()  # current-policy statistics the loss reads, from this forward
    loss_out = algo.loss(out["logprob"], micro.old_logprobs, micro.advantages, mask,
                         **({"token_stats": {n: out[n] for n in loss_stats}} if loss_stats else {}))
    per_token_loss = loss_out.per_token_loss  # [b, T]
    if micro.selected is not None:
        per_token_loss = algo.token_filter.apply(per_token_loss, out["logprob"], micro.old_logprobs, micro.selected)
    # x world_size: DeepSpeed averages gradients over ranks; we want the global sum
    weights = settings.world_size * token_weights(
        mask, algo.loss_aggregation, max_response_length=settings.recipe.rollout.max_new_tokens,
        num_sequences=num_sequences, num_tokens=int(num_tokens),
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
    """`micro` with its old log-probs, the scoring pass's when it ran, else those of this very
    training forward (`logprob`, detached: the policy that sampled, ratio exactly 1), and the
    mismatch weights they give (`algorithm.mismatch`; each row's depends on that row only, so
    they are the whole batch's, row by row). The one place the update computes them."""
    old = micro.old_logprobs if micro.old_logprobs is not None else logprob.detach()
    correction = mismatch.weights(old, micro.sampler_logprobs, micro.response_mask)
    return replace(micro, old_logprobs=old, is_weights=None if correction is None else correction.weights)


def _token_selection(parts: RunParts, batch: RolloutBatch, stats: Stats, advantages: torch.Tensor,
                     minibatch: range, seed: int) -> TokenSelection | None:
    """The token filter's selection over the WHOLE mini-batch (every rank holds every row), so
    neither micro-batching nor the number of ranks changes it."""
    token_filter = parts.settings.recipe.algorithm.token_filter
    if token_filter.name == "none":
        return None
    rows = slice(minibatch.start, minibatch.stop)
    return token_filter.select(stats["logprob"][rows], advantages[rows], batch.response_mask[rows],
                               {n: stats[n][rows] for n in token_filter.stats()}, torch.Generator().manual_seed(seed))


def without_rows(batch: RolloutBatch, rows: torch.Tensor) -> RolloutBatch:
    """The batch with the response mask of `rows` (`[B*G]` bool) zeroed."""
    return replace(batch, response_mask=batch.response_mask.masked_fill(rows.unsqueeze(-1), 0))
