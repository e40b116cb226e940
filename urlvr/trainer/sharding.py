"""Which rank holds which rows of a step's batch.

Rollout, rewards and advantages need whole groups; the update does not. So a step has two
layouts (docs/multi-gpu.md, "How the work is split"):
- **prompts**: rank r generates, rewards and computes the advantages of the contiguous prompts
  `even_shard(prompts_per_step, world_size, r)` of the global batch (30 prompts on 8 ranks:
  4,4,4,4,4,4,3,3). The groups are then gathered, so every rank collates the same global batch
  a single process would.
- **rows**: once advantages exist, each sample's rows are independent. Rank r scores and trains
  `even_shard(rows_per_minibatch, world_size, r)` of every mini-batch's rows; the loop pads a rank
  with fewer micro-batches with dummies (`batching.same_count_on_every_rank`, zero weight) so
  that every rank makes the same number of forward and backward calls: ZeRO-3 gathers parameters
  in every forward, ZeRO-2 reduces gradients in every backward.
In a world of one both layouts are the whole batch, and nothing here changes a bit of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from urlvr.dist import even_shard


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
