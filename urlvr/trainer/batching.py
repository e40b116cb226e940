"""Cutting a collated rollout batch into the micro-batches that the scoring and training forwards
consume. Both use these functions, so the scoring pass and the on-policy training forward see
bit-identical inputs (and the importance ratio is exactly 1).

Three ways to choose a micro-batch's rows (`plan_micro_batches`), one loss:
- fixed: `trainer.micro_batch_size` rows in batch order (the default);
- bucketed (`trainer.bucket_by_length`): the same row count, rows sorted by length first, so
  long rows share a forward with long rows;
- token budget (`trainer.max_tokens_per_micro_batch`): rows sorted by length, packed while
  rows x (longest prompt + longest response among them) stays within the budget.
Every micro-batch is trimmed to its own rows' longest prompt and longest response (prompts are
left-padded and responses right-padded, so the columns cut are padding in every row of it).
The loss uses mini-batch-wide normalisers, so none of this changes a gradient beyond float noise.
Padding-free packing (sequences concatenated, `position_ids` restarting at 0, flash-attention's
variable-length kernels) is not implemented: sdpa and eager attention cannot run it on CPU,
where it would have to be tested. It would be a fourth plan behind the same `micro_batches`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from urlvr.dist import all_reduce_max
from urlvr.recipe.sections.optimisation import TrainerSection
from urlvr.rollout.base import RolloutBatch
from urlvr.rollout.collate import position_ids_from_attention_mask


def plan_micro_batches(prompt_lengths: Sequence[int], response_lengths: Sequence[int], rows: Sequence[int], *,
                       rows_per_micro_batch: int, max_tokens: int | None = None,
                       bucket_by_length: bool = False) -> list[list[int]]:
    """The row indices of each micro-batch. A micro-batch costs rows x (longest prompt + longest
    response): that is the trimmed `[b, P+T]` input its forward processes. Sorted plans put the
    longest rows first, so a budget that does not fit in memory fails in the first forward."""
    order = list(rows)
    if max_tokens is not None or bucket_by_length:
        order.sort(key=lambda r: -(prompt_lengths[r] + response_lengths[r]))  # stable: ties keep batch order
    if max_tokens is None:
        return [order[i:i + rows_per_micro_batch] for i in range(0, len(order), rows_per_micro_batch)]
    plans: list[list[int]] = []
    current: list[int] = []
    longest_prompt = longest_response = 0
    for row in order:
        prompt, response = max(longest_prompt, prompt_lengths[row]), max(longest_response, response_lengths[row])
        if current and (len(current) + 1) * (prompt + response) > max_tokens:  # a row over budget goes alone
            plans.append(current)
            current, prompt, response = [], prompt_lengths[row], response_lengths[row]
        current.append(row)
        longest_prompt, longest_response = prompt, response
    return plans + [current] if current else plans


def micro_batches(batch: RolloutBatch, rows: Sequence[int], trainer: TrainerSection,
                  per_row: Mapping[str, torch.Tensor] | None = None) -> list[dict]:
    """Dicts of the micro-batches of `rows`: `input_ids`, `attention_mask`, `position_ids` `[b, p+t]`,
    `response_mask` `[b, t]`, every tensor of `per_row` (`[B]` or `[B, T]`, cut alike), the
    micro-batch's own `prompt_length` p, its `rows` (indices into the batch) and `dummy` (False)."""
    prompt_lengths = batch.attention_mask[:, :batch.prompt_length].sum(1).tolist()
    response_lengths = batch.response_mask.sum(1).tolist()
    plan = plan_micro_batches(prompt_lengths, response_lengths, rows, rows_per_micro_batch=trainer.micro_batch_size,
                              max_tokens=trainer.max_tokens_per_micro_batch, bucket_by_length=trainer.bucket_by_length)
    position_ids = position_ids_from_attention_mask(batch.attention_mask)  # of the whole row: trimming keeps them
    out = []
    for index in plan:
        # at least one column of each: the scorer reads hidden state p-1 to predict response token 0
        prompt = max(1, max(prompt_lengths[r] for r in index))
        response = max(1, max(response_lengths[r] for r in index))
        picked = torch.tensor(index, device=batch.input_ids.device)
        columns = slice(batch.prompt_length - prompt, batch.prompt_length + response)
        micro = {
            "input_ids": batch.input_ids[picked, columns],
            "attention_mask": batch.attention_mask[picked, columns],
            "position_ids": position_ids[picked, columns],
            "response_mask": batch.response_mask[picked, :response],
            "prompt_length": prompt,
            "rows": picked,
            "dummy": False,
        }
        for name, tensor in (per_row or {}).items():
            micro[name] = tensor[picked, :response] if tensor.dim() == 2 else tensor[picked]
        out.append(micro)
    return out


def same_count_on_every_rank(micros: list[dict]) -> list[dict]:
    """Pad `micros` to the largest count of any rank with dummies (copies of the last micro-batch,
    `dummy=True`: the caller drops their outputs and zeroes their loss). ZeRO gathers parameters in
    every forward (stage 3) and reduces gradients in every backward, so every rank must make the same
    number of calls; with a token budget the count depends on this rank's lengths. One all-reduce."""
    count = int(all_reduce_max(torch.tensor([float(len(micros))], dtype=torch.float64))[0])
    return micros + [{**micros[-1], "dummy": True} for _ in range(count - len(micros))]


def scatter_rows(pieces: Iterable[tuple[dict, Mapping[str, torch.Tensor]]], num_rows: int,
                 response_length: int) -> dict[str, torch.Tensor]:
    """Put per-micro-batch outputs `[b, t]` back at their rows of a `[num_rows, response_length]`
    tensor per name (0 beyond each micro-batch's trimmed width: padding, masked everywhere)."""
    out: dict[str, torch.Tensor] = {}
    for micro, values in pieces:
        for name, value in values.items():
            if name not in out:
                out[name] = value.new_zeros(num_rows, response_length)
            out[name][micro["rows"], :value.shape[1]] = value
    return out


def padding_summary(micros: Iterable[dict]) -> dict[str, float]:
    """`perf/padding_fraction` (padding tokens / processed tokens, dummies all padding) and
    `perf/tokens_per_forward` (processed `[b, p+t]` tokens per forward) of the given forwards."""
    processed = real = forwards = 0
    for micro in micros:
        processed += micro["input_ids"].numel()
        real += 0 if micro["dummy"] else int(micro["attention_mask"].sum())
        forwards += 1
    return {"perf/padding_fraction": 1.0 - real / processed if processed else 0.0,
            "perf/tokens_per_forward": processed / forwards if forwards else 0.0}
