"""Cutting a collated rollout batch into the micro-batches that the scoring and training forwards
consume. Both use these functions, so the scoring pass and the on-policy training forward see
bit-identical inputs (and the importance ratio is exactly 1).

Four ways to choose and lay out a micro-batch's rows (`plan_micro_batches`), one loss:
- fixed: `trainer.micro_batch_size` rows in batch order (the default);
- bucketed (`trainer.bucket_by_length`): the same row count, rows sorted by length first, so
  long rows share a forward with long rows;
- token budget (`trainer.max_tokens_per_micro_batch`): rows sorted by length, packed while
  rows x (longest prompt + longest response among them) stays within the budget;
- padding-free (`trainer.padding_free`, with a budget): the rows' real tokens laid end to end in
  one `[1, L]` row, `position_ids` restarting at 0 for each sequence, no attention mask (the
  model's attention builds the block-diagonal one from the positions), L within the budget.
The padded layouts are trimmed to their own rows' longest prompt and longest response (prompts
are left-padded and responses right-padded, so the columns cut are padding in every row of it).
Every layout is a `MicroBatch` carrying the same `[b, T]` per-row fields (`response_mask`, and
the update's `RowInputs`: advantages, old log-probs, ...), so the loss code never sees the
difference; the scorer reads the packed layout's `predict_index`.
The loss uses mini-batch-wide normalisers, so none of this changes a gradient beyond float noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace

import torch

from urlvr.dist import all_reduce_max
from urlvr.errors import RecipeError
from urlvr.recipe.sections.optimisation import TrainerSection
from urlvr.rollout.base import Group, PromptInput, RolloutBatch, Sample
from urlvr.rollout.collate import collate_groups, position_ids_from_attention_mask


@dataclass(frozen=True, kw_only=True)
class RowInputs:
    """What the update reads per row of the global batch, beyond the rollout's tokens: `[B*G]` or
    `[B*G, T]` each; None where this step has none (the source is `RunSettings.scoring_pass`)."""

    advantages: torch.Tensor | None = None  # [B*G], one per sample
    sampler_logprobs: torch.Tensor | None = None  # [B*G, T] the rollout engine's (mismatch correction)
    old_logprobs: torch.Tensor | None = None  # [B*G, T] the scoring pass's; None: each training forward's own
    ref_logprobs: torch.Tensor | None = None  # [B*G, T] pi_0's, when the loss has a KL term
    selected: torch.Tensor | None = None  # [B*G, T] bool, the token filter's selection


@dataclass(frozen=True, kw_only=True)
class MicroBatch(RowInputs):
    """One forward's input, padded `[b, p+t]` or packed `[1, L]`, with the `RowInputs` of its rows
    cut alike (`[b]` or `[b, t]`). A `dummy` repeats another micro-batch so that every rank makes
    the same number of forward/backward calls (ZeRO); its outputs are dropped, its loss zeroed."""

    input_ids: torch.Tensor  # [b, p+t], or [1, L] packed
    attention_mask: torch.Tensor | None  # [b, p+t]; None packed (positions mark the sequences)
    position_ids: torch.Tensor  # like input_ids
    response_mask: torch.Tensor  # [b, t]
    prompt_length: int  # p, this micro-batch's own (trimmed)
    rows: torch.Tensor  # [b] indices into the collated batch
    predict_index: torch.Tensor | None = None  # [N] packed only: the position predicting each response token
    dummy: bool = False
    is_weights: torch.Tensor | None = None  # [b, t] mismatch correction, set by the update from old_logprobs

    def to(self, device: torch.device | str) -> MicroBatch:
        """The same micro-batch with every tensor on `device`."""
        return replace(self, **{f.name: value.to(device) for f in fields(self)
                                if isinstance(value := getattr(self, f.name), torch.Tensor)})


def plan_micro_batches(prompt_lengths: Sequence[int], response_lengths: Sequence[int], rows: Sequence[int], *,
                       rows_per_micro_batch: int, max_tokens: int | None = None,
                       bucket_by_length: bool = False, packed: bool = False) -> list[list[int]]:
    """The row indices of each micro-batch. A padded micro-batch costs rows x (longest prompt +
    longest response): that is the trimmed `[b, P+T]` input its forward processes; a `packed` one
    costs the sum of its rows' lengths. Sorted plans put the longest rows first, so a budget that
    does not fit in memory fails in the first forward."""
    order = list(rows)
    if max_tokens is not None or bucket_by_length:
        order.sort(key=lambda r: -(prompt_lengths[r] + response_lengths[r]))  # stable: ties keep batch order
    if max_tokens is None:
        return [order[i:i + rows_per_micro_batch] for i in range(0, len(order), rows_per_micro_batch)]
    plans: list[list[int]] = []
    current: list[int] = []
    longest_prompt = longest_response = used = 0
    for row in order:
        prompt, response = max(longest_prompt, prompt_lengths[row]), max(longest_response, response_lengths[row])
        length = prompt_lengths[row] + response_lengths[row]
        cost = used + length if packed else (len(current) + 1) * (prompt + response)
        if current and cost > max_tokens:  # a row over budget goes alone
            plans.append(current)
            current, prompt, response, used = [], prompt_lengths[row], response_lengths[row], 0
        current.append(row)
        longest_prompt, longest_response, used = prompt, response, used + length
    return plans + [current] if current else plans


def budget_warning(max_tokens: int | None, longest_prompt: int, max_new_tokens: int) -> str | None:
    """The start-up warning for a token budget below one full-length row (None when it fits, or
    without a budget). The planner never refuses such a row -- it goes alone, so training stays
    right -- but that forward is over the budget (the memory the budget was sized for) and every
    such row costs a forward of its own; so the run says it once, with the numbers, instead of
    degrading silently. Not refused: whether a row reaches full length is known only as it is
    sampled, and budgets sized for typical lengths are a fair choice (docs/troubleshooting.md)."""
    row = longest_prompt + max_new_tokens
    if max_tokens is None or max_tokens >= row:
        return None
    return (f"urlvr: warning: trainer.max_tokens_per_micro_batch={max_tokens} is below one full-length row (longest "
            f"prompt {longest_prompt} + rollout.max_new_tokens {max_new_tokens} = {row} tokens): a row longer than "
            f"{max_tokens} tokens runs alone in a forward of its own, over the budget; set the budget to at least "
            f"{row}, or lower rollout.max_new_tokens")


def micro_batches(batch: RolloutBatch, rows: Sequence[int], trainer: TrainerSection,
                  inputs: RowInputs = RowInputs()) -> list[MicroBatch]:
    """The micro-batches of `rows`: `input_ids`, `attention_mask`, `position_ids` (`[b, p+t]`,
    or `[1, L]` with `attention_mask` None and a `predict_index` `[N]` when packed),
    `response_mask` `[b, t]`, every field of `inputs` (`[B]` or `[B, T]`, cut alike), the
    micro-batch's own `prompt_length` p and its `rows` (indices into the batch)."""
    prompt_lengths = batch.attention_mask[:, :batch.prompt_length].sum(1).tolist()
    response_lengths = batch.response_mask.sum(1).tolist()
    plan = plan_micro_batches(prompt_lengths, response_lengths, rows, rows_per_micro_batch=trainer.micro_batch_size,
                              max_tokens=trainer.max_tokens_per_micro_batch, bucket_by_length=trainer.bucket_by_length,
                              packed=trainer.padding_free)
    position_ids = position_ids_from_attention_mask(batch.attention_mask)  # of the whole row: trimming keeps them
    out = []
    for index in plan:
        # at least one column of each: the scorer reads hidden state p-1 to predict response token 0
        prompt = max(1, max(prompt_lengths[r] for r in index))
        response = max(1, max(response_lengths[r] for r in index))
        picked = torch.tensor(index, device=batch.input_ids.device)
        # packing needs a prompt token before each response (its last hidden state predicts the
        # first response token) and a response somewhere; otherwise the padded layout serves
        packable = all(prompt_lengths[r] for r in index) and any(response_lengths[r] for r in index)
        if trainer.padding_free and packable:
            micro = _packed_inputs(batch, index, prompt_lengths, response_lengths)
        else:
            columns = slice(batch.prompt_length - prompt, batch.prompt_length + response)
            micro = {"input_ids": batch.input_ids[picked, columns], "attention_mask": batch.attention_mask[picked, columns],
                     "position_ids": position_ids[picked, columns]}
        cut = {f.name: _cut(getattr(inputs, f.name), picked, response) for f in fields(RowInputs)}
        out.append(MicroBatch(**micro, **cut, response_mask=batch.response_mask[picked, :response],
                              prompt_length=prompt, rows=picked))
    return out


def _cut(tensor: torch.Tensor | None, rows: torch.Tensor, width: int) -> torch.Tensor | None:
    """`rows` of a `[B]` tensor, or `rows` and the first `width` columns of a `[B, T]` one."""
    if tensor is None:
        return None
    return tensor[rows, :width] if tensor.dim() == 2 else tensor[rows]


def _packed_inputs(batch: RolloutBatch, index: Sequence[int], prompt_lengths: Sequence[int],
                   response_lengths: Sequence[int]) -> dict:
    """The rows' real tokens end to end: `input_ids` and `position_ids` `[1, L]` (positions restart
    at 0 for each sequence, which is how transformers' attention finds the boundaries),
    `attention_mask` None, and `predict_index` `[N]`: the packed position whose hidden state
    predicts each real response token, in the row-major order of the micro-batch's `response_mask`."""
    start = batch.prompt_length
    ids, positions, predict, offset = [], [], [], 0
    for row in index:
        p, t = prompt_lengths[row], response_lengths[row]
        ids.append(batch.input_ids[row, start - p:start + t])
        positions.append(torch.arange(p + t))
        predict.append(torch.arange(offset + p - 1, offset + p - 1 + t))
        offset += p + t
    device = batch.input_ids.device
    return {"input_ids": torch.cat(ids)[None], "attention_mask": None,
            "position_ids": torch.cat(positions)[None].to(device), "predict_index": torch.cat(predict).to(device)}


def scorer_inputs(micro: MicroBatch, device: torch.device | str) -> dict:
    """The keyword inputs of `TokenScorer` for `micro` (padded or packed), on `device`."""
    keys = ("input_ids", "attention_mask", "position_ids", "response_mask", "predict_index")
    return {"prompt_length": micro.prompt_length,
            **{key: None if getattr(micro, key) is None else getattr(micro, key).to(device) for key in keys}}


def check_padding_free(score: Callable[[MicroBatch], Mapping[str, torch.Tensor]], *, tolerance: float) -> None:
    """Refuse (RecipeError) a model whose attention ignores packed `position_ids`: two short
    sequences scored packed must get the log-probs they get padded, within `tolerance` (nats).
    Without this check such a model would let each sequence attend to the ones packed before it,
    and train on that silently. `score(micro) -> {"logprob": [b, T]}` is the trainer's own scorer."""
    groups = [Group(PromptInput(f"check-{i}", "", prompt), (Sample(response, (0.0,) * len(response), "", "stop"),))
              for i, (prompt, response) in enumerate((((1, 2, 3), (4, 5)), ((6, 7), (8, 9, 10))))]
    batch = collate_groups(groups, pad_token_id=0)
    got = {}
    for packed in (False, True):
        trainer = TrainerSection(max_tokens_per_micro_batch=64, padding_free=packed)
        [micro] = micro_batches(batch, range(2), trainer)
        got[packed] = score(micro)["logprob"].float().cpu() * micro.response_mask.cpu()
    gap = float((got[True] - got[False]).abs().max())
    if not gap <= tolerance:
        raise RecipeError(
            f"trainer.padding_free: this model's attention does not honour packed position_ids (two packed "
            f"sequences differ from their padded scores by {gap:.3g} nats), so packed sequences would see each "
            "other. Use attn_implementation flash_attention_2 or sdpa where the model supports it, or "
            "switch padding_free off (bucketed micro-batches: trainer.max_tokens_per_micro_batch alone).")


def same_count_on_every_rank(micros: list[MicroBatch]) -> list[MicroBatch]:
    """Pad `micros` to the largest count of any rank with dummies (copies of the last micro-batch,
    `dummy=True`: the caller drops their outputs and zeroes their loss). ZeRO gathers parameters in
    every forward (stage 3) and reduces gradients in every backward, so every rank must make the same
    number of calls; with a token budget the count depends on this rank's lengths. One all-reduce."""
    count = int(all_reduce_max(torch.tensor([float(len(micros))], dtype=torch.float64))[0])
    return micros + [replace(micros[-1], dummy=True) for _ in range(count - len(micros))]


def scatter_rows(pieces: Iterable[tuple[MicroBatch, Mapping[str, torch.Tensor]]], num_rows: int,
                 response_length: int) -> dict[str, torch.Tensor]:
    """Put per-micro-batch outputs `[b, t]` back at their rows of a `[num_rows, response_length]`
    tensor per name (0 beyond each micro-batch's trimmed width: padding, masked everywhere)."""
    out: dict[str, torch.Tensor] = {}
    for micro, values in pieces:
        for name, value in values.items():
            if name not in out:
                out[name] = value.new_zeros(num_rows, response_length)
            out[name][micro.rows, :value.shape[1]] = value
    return out


def padding_summary(micros: Iterable[MicroBatch]) -> dict[str, float]:
    """`perf/padding_fraction` (padding tokens / processed tokens, dummies all padding) and
    `perf/tokens_per_forward` (processed `[b, p+t]` tokens per forward) of the given forwards."""
    processed = real = forwards = 0
    for micro in micros:
        processed += micro.input_ids.numel()
        mask = micro.attention_mask  # None: packed, every position a real token
        real += 0 if micro.dummy else int(mask.sum()) if mask is not None else micro.input_ids.numel()
        forwards += 1
    return {"perf/padding_fraction": 1.0 - real / processed if processed else 0.0,
            "perf/tokens_per_forward": processed / forwards if forwards else 0.0}
