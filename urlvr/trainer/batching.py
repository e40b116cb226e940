"""Slicing a collated rollout batch into the micro-batches that the scoring and training
forwards consume. Both use this one function, so the scoring pass and the on-policy training
forward see bit-identical inputs (and the importance ratio is exactly 1)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from urlvr.rollout.base import RolloutBatch
from urlvr.rollout.collate import position_ids_from_attention_mask


def micro_batches(
    batch: RolloutBatch, rows: range, micro_batch_size: int, per_row: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[dict]:
    """Yield dicts of row slices (`input_ids`, `attention_mask`, `position_ids`, `response_mask`,
    plus every tensor of `per_row` sliced on its first dim) and the shared `prompt_length`."""
    position_ids = position_ids_from_attention_mask(batch.attention_mask)
    for start in range(rows.start, rows.stop, micro_batch_size):
        rows_slice = slice(start, min(start + micro_batch_size, rows.stop))
        micro = {
            "input_ids": batch.input_ids[rows_slice],
            "attention_mask": batch.attention_mask[rows_slice],
            "position_ids": position_ids[rows_slice],
            "response_mask": batch.response_mask[rows_slice],
            "prompt_length": batch.prompt_length,
            "rows": rows_slice,
        }
        for name, tensor in (per_row or {}).items():
            micro[name] = tensor[rows_slice]
        yield micro
