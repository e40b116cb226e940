"""The prompt stream the trainer pulls from: seeded per-epoch shuffles, rank shards, resume.

Positions are global -- (epoch, offset into that epoch's order) -- and the order of epoch e
depends only on (seed, e). So every rank computes the same global batch and keeps its own
contiguous slice of whole prompts (a group is never split across ranks; the slices differ by at
most one prompt when the world size does not divide the batch), the order does not change with
the world size, and a checkpoint taken on 8 ranks resumes on 4 or 3.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

from urlvr.data.records import PromptRecord
from urlvr.dist import even_shard


class PromptStream:
    """Endless (or ``epochs``-long) stream of prompt batches; ``next_batch`` returns this
    rank's share of the next global batch (``even_shard``: 30 prompts on 8 ranks give
    4,4,4,4,4,4,3,3)."""

    def __init__(
        self,
        records: Sequence[PromptRecord],
        *,
        prompts_per_step: int,
        seed: int,
        shuffle: bool = True,
        epochs: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not records:
            raise ValueError("PromptStream needs at least one prompt, got none")
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None (endless), got {epochs}")
        self.records = list(records)
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.shuffle = shuffle
        self.epochs = epochs
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0  # epoch of the next prompt to hand out
        self.offset = 0  # its index into that epoch's order
        self.steps_taken = 0
        self._order_cache: tuple[int, list[int]] | None = None

    def steps_available(self) -> int | None:
        """Full steps in ``epochs`` passes (a trailing partial batch is dropped); None if endless."""
        if self.epochs is None:
            return None
        return self.epochs * len(self.records) // self.prompts_per_step

    def next_batch(self, num_prompts: int | None = None) -> list[PromptRecord]:
        """This rank's slice of the next global batch of ``num_prompts`` prompts (default
        ``prompts_per_step``; a round of dynamic sampling may draw another size); StopIteration
        after the last full batch."""
        size = self.prompts_per_step if num_prompts is None else num_prompts
        if size < 1:
            raise ValueError(f"a batch holds at least one prompt, got {size}")
        last = None if self.epochs is None else self.epochs * len(self.records)
        if last is not None and self._position() + size > last:
            raise StopIteration(f"prompt stream exhausted after {self.epochs} epochs")
        # Every rank walks the whole global batch so that all ranks advance identically.
        global_batch = [self._take_one() for _ in range(size)]
        self.steps_taken += 1
        mine = even_shard(size, self.world_size, self.rank)
        return global_batch[mine.start : mine.stop]

    def __iter__(self) -> Iterator[list[PromptRecord]]:
        return self

    def __next__(self) -> list[PromptRecord]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The exact position, plus what must match on resume (seed, shuffle, the prompt set)."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "steps_taken": self.steps_taken,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_records": len(self.records),
            "records_fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position. A different seed, shuffle flag or prompt set would
        silently replay or skip prompts, so those are refused."""
        mine = self.state_dict()
        for key in ("seed", "shuffle", "num_records", "records_fingerprint"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"cannot resume the prompt stream: {key} was {state[key]!r} in the checkpoint "
                    f"but is {mine[key]!r} now (same prompts, seed and shuffle are needed)"
                )
        if not 0 <= state["offset"] < len(self.records) or state["epoch"] < 0:
            raise ValueError(
                f"prompt stream state out of range: epoch={state['epoch']}, offset={state['offset']}"
            )
        self.epoch = state["epoch"]
        self.offset = state["offset"]
        self.steps_taken = state["steps_taken"]

    # ----------------------------------------------------------------------- internals
    def _position(self) -> int:
        return self.epoch * len(self.records) + self.offset

    def _take_one(self) -> PromptRecord:
        record = self.records[self._order(self.epoch)[self.offset]]
        self.offset += 1
        if self.offset == len(self.records):  # wrap: a batch may span the epoch boundary
            self.epoch += 1
            self.offset = 0
        return record

    def _order(self, epoch: int) -> list[int]:
        """Record indices in epoch ``epoch``'s order, seeded by (seed, epoch) only."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        order = list(range(len(self.records)))
        if self.shuffle:
            # A string seed is hashed with SHA-512 by `random`: stable across runs and
            # processes (unlike hash()), and fine for negative seeds.
            random.Random(f"urlvr-prompts:{self.seed}:{epoch}").shuffle(order)
        self._order_cache = (epoch, order)
        return order

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(record.prompt_id.encode())
            digest.update(b"\0")
        return digest.hexdigest()[:16]
