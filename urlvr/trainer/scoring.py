"""The step's forwards without gradient, over rows of the collated global batch: the scoring
pass (old log-probs and the declared token statistics), the statistics of rows the update masks,
and the KL reference pass. Each rank computes its rows (`RowLayout.scored_rows`) and the rows are
then summed over ranks, so every rank holds every row's statistics, exactly.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from urlvr.dist import all_reduce_sum
from urlvr.rollout.base import RolloutBatch
from urlvr.trainer.batching import MicroBatch, RowInputs, micro_batches, same_count_on_every_rank, scorer_inputs
from urlvr.trainer.build import RunParts
from urlvr.trainer.sharding import RowLayout
from urlvr.trainer.stages import Rollout, Stats, scoring_pass


def micro_batches_on_every_rank(parts: RunParts, batch: RolloutBatch, rows, inputs: RowInputs = RowInputs(),
                                 ) -> list[MicroBatch]:
    """This rank's micro-batches of `rows`, padded with dummies to the count of the rank with the
    most (ZeRO needs equal forward/backward calls); a rank with no rows runs dummies only."""
    trainer = parts.settings.recipe.trainer
    micros = micro_batches(batch, rows, trainer, inputs) if len(rows) else \
        [replace(micro_batches(batch, [0], trainer, inputs)[0], dummy=True)]
    return same_count_on_every_rank(micros)


def gather_rows(local: Stats, layout: RowLayout, names, batch: RolloutBatch) -> Stats:
    """Every rank's rows of the `[B*G, T]` statistics `names` (`local` holds zeros where another
    rank computed the row, and may lack a name on a rank that had no rows): each row is computed
    by exactly one rank, so a sum over ranks puts every row in place, exactly."""
    if layout.world_size == 1:
        return local
    return {name: all_reduce_sum(local[name] if name in local else torch.zeros_like(batch.sampler_logprobs))
            for name in names}


def score_rows(parts: RunParts, batch: RolloutBatch, rows, stats: tuple[str, ...] | None = None,
                raw_stats: tuple[str, ...] | None = None) -> Stats:
    """The scoring pass over `rows` of `batch`: `stats` (default: the run's declared scoring
    statistics, and certainty also on raw logits when reward.certainty_logits asks), `[B*G, T]`
    each, zero on the other rows. Every rank calls it (with no rows: dummy forwards only)."""
    settings = parts.settings
    stats = settings.score_stats if stats is None else stats
    raw_stats = settings.raw_score_stats if raw_stats is None else raw_stats
    return scoring_pass(micro_batches_on_every_rank(parts, batch, rows),
                        lambda micro: parts.actor.score(micro, stats, raw_stats, temperature=settings.temperature), batch)


def score_global_batch(parts: RunParts, batch: RolloutBatch) -> Stats:
    """Each rank scores its rows of the global batch; the rows are then gathered, so every rank
    holds every row's statistics."""
    settings, layout = parts.settings, parts.settings.layout
    local = score_rows(parts, batch, [row for run in layout.scored_rows() for row in run])
    return gather_rows(local, layout, [*settings.score_stats, *(f"raw_{n}" for n in settings.raw_score_stats)], batch)


def score_masked_rows(parts: RunParts, rollout: Rollout) -> Stats | None:
    """The statistics the training forwards compute (`[B*G, T]` each, every rank's rows) of the
    rows the update masks (`mask_truncated`), by a no-grad forward of the rollout's policy, zero
    elsewhere; None when no scoring pass stands in or no row is masked. Why: the training forward
    of a masked row computes nothing for it, and the metrics (entropy, sampler mismatch, KL to
    pi_0, the collapse detectors) describe every sampled token. No backward."""
    settings, rows = parts.settings, rollout.truncated
    if settings.scoring_pass or rows is None or not rows.any():
        return None
    layout, names = settings.layout, (*settings.train_stats, *settings.logged_train_stats)
    own = [row for run in layout.scored_rows() for row in run if rows[row]]  # this rank's share of them
    return gather_rows(score_rows(parts, rollout.batch, own, names, ()), layout, names, rollout.batch)


@torch.no_grad()
def reference_logprobs(parts: RunParts, batch: RolloutBatch) -> torch.Tensor:
    """pi_0's log-probs of every row: each rank its scored rows, then gathered (no dummies: the
    reference is a plain module, no collectives)."""
    settings, layout = parts.settings, parts.settings.layout
    rows = [row for run in layout.scored_rows() for row in run]
    device = next(parts.reference.parameters()).device  # the training device, or the host (dynamics.kl_reference_device)
    local = scoring_pass(micro_batches(batch, rows, settings.recipe.trainer) if rows else [], lambda micro: {
        "logprob": parts.reference(**scorer_inputs(micro, device), temperature=settings.temperature,
                                   stats=("logprob",))["logprob"].to(batch.input_ids.device)}, batch)
    return gather_rows(local or {"logprob": torch.zeros_like(batch.sampler_logprobs)}, layout, ["logprob"],
                        batch)["logprob"]
