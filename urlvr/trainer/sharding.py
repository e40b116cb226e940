"""Which rank holds which rows of a step's batch.

Rollout, rewards and advantages need whole groups; the update does not. So a step has two
layouts (docs/multi-gpu.md, "How the work is split"):
- **prompts**: rank r generates, rewards and computes the advantages of the contiguous prompts
  `even_shard(prompts_per_step, world_size, r)` of the global batch (30 prompts on 8 ranks:
  4,4,4,4,4,4,3,3). The groups are then gathered, so every rank collates the same global batch
  a single process would.
- **rows**: once advantages exist, each sample's rows are independent. Rank r scores and trains
  `even_shard(rows_per_minibatch, world_size, r)` of every mini-batch's rows, and a rank with
  fewer rows adds *filler* micro-batches (one real row, zero weight) so that every rank makes
  the same number of forward and backward calls: ZeRO-3 gathers parameters in every forward,
  ZeRO-2 reduces gradients in every backward, and DeepSpeed's accumulation boundary counts calls.
In a world of one both layouts are the whole batch, and nothing here changes a bit of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from urlvr.dist import all_gather_rows, even_shard
from urlvr.rollout.base import RolloutBatch
from urlvr.trainer.batching import micro_batches


@dataclass(frozen=True)
class RowLayout:
    rows: int  # rows of the global batch: prompts_per_step x group_size
    rows_per_minibatch: int  # prompts_per_minibatch x group_size, all ranks together
    micro_batch_size: int
    world_size: int
    rank: int

    def minibatch_rows(self, minibatch_start: int, rank: int | None = None) -> range:
        """`rank`'s share (this rank's by default) of the mini-batch starting at global row `minibatch_start`."""
        share = even_shard(self.rows_per_minibatch, self.world_size, self.rank if rank is None else rank)
        return range(minibatch_start + share.start, minibatch_start + share.stop)

    def scored_rows(self, rank: int | None = None) -> list[range]:
        """The rows `rank` scores: its share of every mini-batch, adjacent shares merged into one
        run (in a world of one: the whole batch, chunked as one run)."""
        runs: list[range] = []
        for start in range(0, self.rows, self.rows_per_minibatch):
            share = self.minibatch_rows(start, rank)
            if runs and runs[-1].stop == share.start:
                runs[-1] = range(runs[-1].start, share.stop)
            elif share:
                runs.append(share)
        return runs

    @property
    def micro_steps_per_minibatch(self) -> int:
        """Forward/backward calls per mini-batch on every rank (DeepSpeed's accumulation steps):
        enough for the largest share."""
        return math.ceil(math.ceil(self.rows_per_minibatch / self.world_size) / self.micro_batch_size)

    @property
    def score_calls(self) -> int:
        """Scoring forwards per step on every rank: enough for the rank with the most."""
        return max(sum(math.ceil(len(run) / self.micro_batch_size) for run in self.scored_rows(rank))
                   for rank in range(self.world_size))

    def micro_batches(self, batch: RolloutBatch, runs: Sequence[range], calls: int,
                      per_row: Mapping[str, torch.Tensor] | None = None) -> Iterator[tuple[dict, bool]]:
        """(micro-batch, is_real) pairs: the micro-batches of `runs`, then fillers up to `calls`.
        A filler is the first row of the batch; its caller gives it zero weight."""
        real = [micro for run in runs for micro in micro_batches(batch, run, self.micro_batch_size, per_row)]
        if len(real) > calls:
            raise RuntimeError(f"rank {self.rank} has {len(real)} micro-batches, more than the {calls} planned")
        yield from ((micro, True) for micro in real)
        for _ in range(calls - len(real)):
            yield next(micro_batches(batch, range(0, 1), 1, per_row)), False

    def gather_scored(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's scored rows (`local`, in `scored_rows` order) put back in global row order."""
        if self.world_size == 1:
            return local
        gathered = all_gather_rows(local)
        order = torch.tensor([row for rank in range(self.world_size) for run in self.scored_rows(rank) for row in run],
                             device=gathered.device)
        out = torch.empty_like(gathered)
        out[order] = gathered
        return out
