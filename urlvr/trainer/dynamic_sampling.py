"""Dynamic sampling with refill (DAPO, Yu et al. 2025, Sec. 3.2): the rollout stage of a step when
`rollout.dynamic_sampling` names a filter.

    round r = 0, 1, ...: every rank takes its slice of the next global batch of R =
        `prompts_per_round` prompts (the generation batch; default P) from the prompt stream,
        generates, rewards its new groups (per round, so rewards never see two rounds at once)
        and flags each group informative or not; the [R] flags are gathered, so every rank
        knows the global count and all stop after the same round:
        when >= P = prompts_per_step groups were informative, or after `max_rounds`.
    select: the first P informative groups in draw order (round, then global-batch position);
        short of P at the cap, filtered groups fill the step, the filter's `fill_priority` first
        (agreement: groups with a reward spread before zero-variance ones). Groups drawn beyond
        the P-th informative one are dropped, informative or not, and never carried to the next
        step (their prompts are consumed), as in DAPO and verl's `gen_batch_size` loop.
    share: rank k trains the selected groups at positions `even_shard(P, W, k)` (the step's prompt
        shards: 30 over 8 ranks is 4,4,4,4,4,4,3,3), whole; a group drawn on another rank (rank k
        draws positions `even_shard(R, W, k)` of each round) moves there whole, with its reward
        rows (one all_gather_object of the moved groups).

Why a global selection rather than a quota per rank: the selection reads global flags only, so
the trained groups, their order and hence the gradient are those of a one-process run (seeds are
per (step, global prompt index), and round r's prompts hold indices r*R .. r*R+R-1), every rank
trains its shard of the P groups, and no rank is short while another discards informative groups.
Why fill at the cap rather than train on fewer groups: the update's shapes (rows per mini-batch,
DeepSpeed's accumulation steps) stay fixed; a filled zero-variance group adds no gradient, only
tokens to the normaliser, exactly as without the filter.
Why drop the surplus rather than carry it: a carried group would train a step after the policy
that sampled it (off-policy by one update), and the checkpoint would have to hold its samples.
Dropped, the stream's position after the step (all rounds consumed, saved in the checkpoint as
always) is the whole state, so resume is exact. Every rank runs every round (same generate and
forward calls under ZeRO-3).

The trained groups' `reward/*` and `dynamics/majority_ratio` describe what the filter let
through; `dynamic_sampling/generated_*` describe every group generated in the step's rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from urlvr.algorithms.group_filters import GroupFilter, select_groups
from urlvr.data.records import PromptRecord
from urlvr.dist import DistInfo, all_gather_objects, all_gather_rows, even_shard
from urlvr.metrics.dynamics import majority_ratios
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


def dynamic_sample(next_batch: Callable[[int], list[PromptRecord]], sample_round: Callable[[list[PromptRecord], int], Round],
                   group_filter: GroupFilter, prompts_per_step: int, prompts_per_round: int, dist: DistInfo) -> Sampled:
    """Rounds of `sample_round(next_batch(prompts_per_round), r)` until `prompts_per_step` groups
    are informative or `group_filter.max_rounds` ran; then this rank's share of the selection
    (module docstring). `next_batch(n)` returns this rank's slice `even_shard(n, W, rank)` of the
    stream's next n prompts."""
    rounds: list[Round] = []
    flags: list[torch.Tensor] = []  # per round, [R, 5] global: (informative, fill priority, *_group_means)
    while True:
        out = sample_round(next_batch(prompts_per_round), len(rounds))
        rounds.append(out)
        total, voters = out.rewards.total.double(), [ctx.voters for ctx in out.contexts]
        local = torch.stack([group_filter.keep(total, voters).double(), group_filter.fill_priority(total, voters),
                             *_group_means(out)], dim=1)
        flags.append(all_gather_rows(local))  # [R, 5], in global-batch order
        informative = int(sum(f[:, 0].sum() for f in flags))
        if informative >= prompts_per_step or len(rounds) >= group_filter.max_rounds:
            break
    every = torch.cat(flags)  # [rounds * R, 5]
    selected, filled = select_groups(every[:, 0].bool(), every[:, 1], prompts_per_step)
    mine = _gather_mine(rounds, selected, prompts_per_step, prompts_per_round, dist.world_size, dist.rank)
    errors = {key: sum(r.rewards.errors[key] for r in rounds) / len(rounds) for key in rounds[0].rewards.errors}
    drawn = len(rounds) * prompts_per_round
    timeouts = {key: sum(r.rewards.timeouts[key] for r in rounds) for key in rounds[0].rewards.timeouts}  # every round's
    metrics = {
        "dynamic_sampling/rounds": float(len(rounds)),
        "dynamic_sampling/prompts_consumed": float(drawn),
        "dynamic_sampling/filtered_fraction": 1.0 - informative / drawn,
        "dynamic_sampling/filled_groups": float(filled),
        **_generated_metrics(every),
    }
    return Sampled(records=[m[0] for m in mine], drawn=[m[1] for m in mine], groups=[m[2] for m in mine],
                   rewards=_stack_rewards([m[3] for m in mine], errors, timeouts), metrics=metrics)


def _group_means(out: Round) -> list[torch.Tensor]:
    """Per group of the round, `[b]` float64 each: the mean proxy reward, the mean oracle reward
    (NaN without a label or without an oracle) and p_maj. Every group has G samples, so a mean
    over groups of these is the mean over samples that `reward/proxy_mean` and
    `reward/ground_truth_mean` take over the trained groups."""
    total = out.rewards.total.double()
    oracle = out.rewards.oracle
    ground_truth = torch.full((total.shape[0],), float("nan"), dtype=torch.float64) if oracle is None \
        else oracle.double().mean(dim=1)  # a NaN row (no label) stays NaN
    return [total.mean(dim=1), ground_truth, majority_ratios([ctx.voters for ctx in out.contexts])]


def _generated_metrics(every: torch.Tensor) -> dict[str, float]:
    """The rewards of every generated group of the step (all rounds, all ranks; `every` [N, 5] as
    gathered), beside the trained groups' `reward/*`, which the filter biases: the trained
    proxy reward of `zero_variance` never sees the flat all-0 or all-1 groups, and the trained
    p_maj of `agreement` is <= max_agreement by construction. The ground truth covers the
    labelled groups, and is absent without any (as `reward/ground_truth_mean`)."""
    proxy, ground_truth, p_maj = every[:, 2], every[:, 3], every[:, 4]
    out = {"dynamic_sampling/generated_proxy_mean": float(proxy.mean()),
           "dynamic_sampling/generated_majority_ratio": float(p_maj.mean())}
    labelled = ~torch.isnan(ground_truth)
    if bool(labelled.any()):
        out["dynamic_sampling/generated_ground_truth_mean"] = float(ground_truth[labelled].mean())
    return out


def _gather_mine(rounds: Sequence[Round], selected: Sequence[int], prompts_per_step: int, prompts_per_round: int,
                 world_size: int, rank: int) -> list[tuple]:
    """(record, voters, group, reward rows) of this rank's share of `selected`, fetched from the
    ranks that drew them. Global index i = round * R + position in the round's global batch;
    rank r draws the positions `even_shard(R, world_size, r)` of every round, and trains the
    positions `even_shard(P, world_size, r)` of the selection (the step's prompt shards)."""
    drawn_shards = [even_shard(prompts_per_round, world_size, r) for r in range(world_size)]
    drawer = [r for r, shard in enumerate(drawn_shards) for _ in shard]  # position in a round -> its rank
    trained_shards = [even_shard(prompts_per_step, world_size, r) for r in range(world_size)]
    trainer = [r for r, shard in enumerate(trained_shards) for _ in shard]  # position in the selection -> its rank

    def drawn_by(i: int) -> int:
        return drawer[i % prompts_per_round]

    def held(i: int) -> tuple:
        position = i % prompts_per_round
        r, b = rounds[i // prompts_per_round], position - drawn_shards[drawer[position]].start
        return r.records[b], r.drawn[b], r.groups[b], _reward_rows(r.rewards, b)

    destination = {i: trainer[k] for k, i in enumerate(selected)}
    moving = [(i, held(i)) for i in selected if drawn_by(i) == rank and destination[i] != rank]
    arrived = dict(all_gather_objects(moving))  # every rank calls it, in the same place
    mine = selected[trained_shards[rank].start:trained_shards[rank].stop]
    return [held(i) if drawn_by(i) == rank else arrived[i] for i in mine]


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
