"""Dynamic sampling with refill (DAPO, Yu et al. 2025, Sec. 3.2): the rollout stage of a step when
`rollout.dynamic_sampling` names a filter.

    round r = 0, 1, ...: every rank takes its slice of the next global batch from the prompt stream,
        generates, rewards its new groups (per round, so rewards never see two rounds at once)
        and flags each group informative or not; the [P] flags are gathered, so every rank
        knows the global count and all stop after the same round:
        when >= P = prompts_per_step groups were informative, or after `max_rounds`.
    select: the first P informative groups in draw order (round, then global-batch position);
        short of P at the cap, filtered groups fill the step, the filter's `fill_priority` first
        (agreement: groups with a reward spread before zero-variance ones). Groups drawn beyond
        the P-th informative one are discarded (their prompts are consumed, as in DAPO).
    share: rank k trains the selected groups at positions `even_shard(P, W, k)` (the step's prompt
        shards: 30 over 8 ranks is 4,4,4,4,4,4,3,3), whole; a group drawn on another rank moves
        there whole, with its reward rows (one all_gather_object of the moved groups).

Why a global selection rather than a quota per rank: the selection reads global flags only, so
the trained groups, their order and hence the gradient are those of a one-process run (seeds are
per (step, global prompt index), and round r's prompts hold indices r*P .. r*P+P-1), every rank
trains its shard of the P groups, and no rank is short while another discards informative groups.
Why fill at the cap rather than train on fewer groups: the update's shapes (rows per mini-batch,
DeepSpeed's accumulation steps) stay fixed; a filled zero-variance group adds no gradient, only
tokens to the normaliser, exactly as without the filter.
The stream's position after the step is all rounds consumed, saved in the checkpoint as always,
so resume is exact. Every rank runs every round (same generate and forward calls under ZeRO-3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from urlvr.trainer.group_filters import GroupFilter, select_groups
from urlvr.data.records import PromptRecord
from urlvr.dist import DistInfo, all_gather_objects, all_gather_rows, even_shard
from urlvr.rewards.base import RewardContext
from urlvr.rewards.compose import BatchRewards
from urlvr.rollout.base import Group


@dataclass(frozen=True)
class Round:
    """One round on this rank: its prompts, their voting and trained groups, contexts and rewards."""

    records: list[PromptRecord]
    drawn: list[Group]
    groups: list[Group]
    contexts: list[RewardContext]
    rewards: BatchRewards


@dataclass(frozen=True)
class Sampled:
    """This rank's share of the step's selected groups, in draw order, with their rewards."""

    records: list[PromptRecord]
    drawn: list[Group]
    groups: list[Group]
    rewards: BatchRewards
    metrics: dict[str, float]  # dynamic_sampling/*, global (the same on every rank)


def dynamic_sample(next_batch: Callable[[], list[PromptRecord]], sample_round: Callable[[list[PromptRecord], int], Round],
                   group_filter: GroupFilter, prompts_per_step: int, dist: DistInfo) -> Sampled:
    """Rounds of `sample_round(next_batch(), r)` until `prompts_per_step` groups are informative
    or `group_filter.max_rounds` ran; then this rank's share of the selection (module docstring)."""
    rounds: list[Round] = []
    flags: list[torch.Tensor] = []  # per round, [P, 2] global: (informative, fill priority)
    while True:
        out = sample_round(next_batch(), len(rounds))
        rounds.append(out)
        total, voters = out.rewards.total.double(), [ctx.voters for ctx in out.contexts]
        local = torch.stack([group_filter.keep(total, voters).double(), group_filter.fill_priority(total, voters)], dim=1)
        flags.append(all_gather_rows(local))  # [P, 2], in global-batch order
        informative = int(sum(f[:, 0].sum() for f in flags))
        if informative >= prompts_per_step or len(rounds) >= group_filter.max_rounds:
            break
    every = torch.cat(flags)  # [rounds * P, 2]
    selected, filled = select_groups(every[:, 0].bool(), every[:, 1], prompts_per_step)
    mine = _gather_mine(rounds, selected, prompts_per_step, dist.world_size, dist.rank)
    errors = {key: sum(r.rewards.errors[key] for r in rounds) / len(rounds) for key in rounds[0].rewards.errors}
    timeouts = {key: sum(r.rewards.timeouts[key] for r in rounds) for key in rounds[0].rewards.timeouts}  # every round's
    metrics = {
        "dynamic_sampling/rounds": float(len(rounds)),
        "dynamic_sampling/prompts_consumed": float(len(rounds) * prompts_per_step),
        "dynamic_sampling/filtered_fraction": 1.0 - informative / (len(rounds) * prompts_per_step),
        "dynamic_sampling/filled_groups": float(filled),
    }
    return Sampled(records=[m[0] for m in mine], drawn=[m[1] for m in mine], groups=[m[2] for m in mine],
                   rewards=_stack_rewards([m[3] for m in mine], errors, timeouts), metrics=metrics)


def _gather_mine(rounds: Sequence[Round], selected: Sequence[int], prompts_per_step: int, world_size: int,
                 rank: int) -> list[tuple]:
    """(record, voters, group, reward rows) of this rank's share of `selected`, fetched from the
    ranks that drew them. Global index i = round * P + position in the global batch; rank r draws
    and trains the positions `even_shard(P, world_size, r)` (the step's prompt shards)."""
    shards = [even_shard(prompts_per_step, world_size, r) for r in range(world_size)]
    owner = [r for r, shard in enumerate(shards) for _ in shard]  # position in a batch -> its rank

    def drawn_by(i: int) -> int:
        return owner[i % prompts_per_step]

    def held(i: int) -> tuple:
        position = i % prompts_per_step
        r, b = rounds[i // prompts_per_step], position - shards[owner[position]].start
        return r.records[b], r.drawn[b], r.groups[b], _reward_rows(r.rewards, b)

    destination = {i: owner[k] for k, i in enumerate(selected)}
    moving = [(i, held(i)) for i in selected if drawn_by(i) == rank and destination[i] != rank]
    arrived = dict(all_gather_objects(moving))  # every rank calls it, in the same place
    return [held(i) if drawn_by(i) == rank else arrived[i] for i in selected[shards[rank].start:shards[rank].stop]]


def _reward_rows(rewards: BatchRewards, b: int) -> dict:
    return {"total": rewards.total[b], "per_term": {k: v[b] for k, v in rewards.per_term.items()},
            "oracle": None if rewards.oracle is None else rewards.oracle[b],
            "diagnostics": {k: v[b] for k, v in rewards.diagnostics.items()}}


def _stack_rewards(rows: Sequence[dict], errors: dict[str, float], timeouts: dict[str, int]) -> BatchRewards:
    """The selected groups' reward rows as one [B, G] batch; rows drawn without a label (or
    without a diagnostic) get NaN there, as `score_batch` writes them."""
    nan = torch.full_like(rows[0]["total"], float("nan"))
    oracle = None
    if any(row["oracle"] is not None for row in rows):
        oracle = torch.stack([nan if row["oracle"] is None else row["oracle"] for row in rows])
    diagnostic_keys = sorted({k for row in rows for k in row["diagnostics"]})
    return BatchRewards(
        total=torch.stack([row["total"] for row in rows]),
        per_term={k: torch.stack([row["per_term"][k] for row in rows]) for k in rows[0]["per_term"]},
        oracle=oracle,
        diagnostics={k: torch.stack([row["diagnostics"].get(k, nan) for row in rows]) for k in diagnostic_keys},
        errors=errors, timeouts=timeouts)
