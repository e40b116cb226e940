"""The records handed from stage to stage of a GRPO step, and the stages that more than the loop
use: `Rollout -> Scored -> MicroBatch (trainer/batching.py) -> UpdateResult`.

`score_and_reward` is the one scoring-and-reward stage: the loop runs it on the global batch,
dynamic sampling on each round's new groups (trainer/dynamic_sampling.py), `urlvr probe` on a
model's samples before any training (commands/probe.py). Each passes its own scoring forward
(the actor's with its dummies under ZeRO, or a plain `TokenScorer`) and policy handle; the
contexts and rewards are built the same way for all three.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from urlvr.algorithms.mismatch import MismatchWeights
from urlvr.data.records import PromptRecord
from urlvr.rewards.base import RewardContext
from urlvr.rewards.compose import BatchRewards, RewardTermSpec, score_batch
from urlvr.rewards.policy import EnginePolicy
from urlvr.rollout.base import Group, RolloutBatch, RolloutEngine
from urlvr.trainer.batching import MicroBatch, scatter_rows
from urlvr.trainer.settings import RunSettings

Stats = dict[str, torch.Tensor]  # token statistics by name, `[B*G, T]` each
Logs = list[tuple[dict[str, float], int]]  # (metrics, weight) per micro-batch (its real tokens) or optimizer step (1)


class StageTimer(dict):
    """Wall time per named stage, reported as `time/<stage>` (a stage timed twice adds up)."""

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self[f"time/{stage}"] = self.get(f"time/{stage}", 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class Rollout:
    """This rank's prompts and their samples, with the collated rows they are scored and trained on."""

    records: list[PromptRecord]  # this rank's prompts
    drawn: list[Group]  # their voting groups (`reward.vote_group_size` samples; the trained ones first)
    groups: list[Group]  # the trained groups: the first `group_size` samples of each
    batch: RolloutBatch  # collated on the training device: the global batch in the loop, else these groups
    own: slice  # the rows of `batch` that hold `groups`, in order
    first_prompt: int  # global index of this rank's first prompt (seeds the policy handle)
    rewards: BatchRewards | None = None  # rewarded already (dynamic sampling rewards each round)
    sampling_metrics: dict[str, float] = field(default_factory=dict)  # dynamic_sampling/*, global
    truncated: torch.Tensor | None = None  # [B*G] bool, finish reason `length`, where algorithm.mask_truncated


@dataclass(frozen=True)
class Scored:
    """The scoring pass's statistics (`{}` when none ran), and this rank's contexts, rewards and
    (in the loop) the global batch's advantages `[B*G]`."""

    stats: Stats
    contexts: list[RewardContext]
    rewards: BatchRewards
    advantages: torch.Tensor | None = None
    advantage_metrics: dict[str, float] = field(default_factory=dict)  # algorithm.advantage_shaping's, global


@dataclass(frozen=True)
class UpdateResult:
    """What the update leaves for the metrics: every row's statistics of the policy that sampled
    (the scoring pass's, or the training forwards' own), the mismatch correction of the whole
    batch, and the (metrics, weight) logs of its micro-batches and optimizer steps."""

    stats: Stats
    correction: MismatchWeights | None
    logs: Logs


def scoring_pass(micros: Sequence[MicroBatch], score: Callable[[MicroBatch], Mapping[str, torch.Tensor]],
                 batch: RolloutBatch) -> Stats:
    """`score` over every micro-batch (dummies too: under ZeRO every rank makes the same calls),
    the real ones' outputs put at their rows of `[B*G, T]` tensors, zero elsewhere."""
    pieces = [(micro, score(micro)) for micro in micros]
    return scatter_rows([(micro, out) for micro, out in pieces if not micro.dummy], *batch.response_mask.shape)


def score_and_reward(rollout: Rollout, score: Callable[[Rollout], Stats], policy: EnginePolicy,
                     settings: RunSettings, tokenizer, timer: StageTimer | None = None,
                     rewarder: Callable[..., BatchRewards] | None = None) -> Scored:
    """Stage `score` (`score(rollout)`: the statistics of `rollout.batch`'s rows, `{}` when no
    forward is needed) then stage `reward`: one context per group of this rank, lending the
    rewards' statistics of its rows, and the recipe's reward terms over the groups (unless the
    rollout was rewarded already). `rewarder(groups, contexts, policy)` replaces the recipe's
    `score_batch` call (the probe scores its terms one at a time, dropping those that raise)."""
    timer = timer if timer is not None else StageTimer()
    with timer("score"):
        stats = score(rollout)
    with timer("reward"):
        lent = {name: value[rollout.own] for name, value in settings.lent_stats(stats).items()}
        contexts = reward_contexts(settings, rollout, lent, tokenizer)
        if rollout.rewards is not None:
            rewards = rollout.rewards
        elif rewarder is not None:
            rewards = rewarder(rollout.groups, contexts, policy)
        else:
            rewards = score_batch(rollout.groups, contexts, reward_terms(settings), settings.recipe.reward.oracle, policy)
    return Scored(stats, contexts, rewards)


def reward_contexts(settings: RunSettings, rollout: Rollout, lent: Stats, tokenizer) -> list[RewardContext]:
    """One reward context per group of `rollout`, lending the statistics of its rows (`lent` holds
    the rows of `rollout.own`, in order)."""
    size, mask = settings.group_size, rollout.batch.response_mask[rollout.own]
    return [settings.reward_context(group, voters, record, mask[g * size:(g + 1) * size],
                                    {name: value[g * size:(g + 1) * size] for name, value in lent.items()}, tokenizer)
            for g, (group, voters, record) in enumerate(zip(rollout.groups, rollout.drawn, rollout.records,
                                                            strict=True))]


def reward_terms(settings: RunSettings) -> list[RewardTermSpec]:
    """The recipe's reward terms as the composer takes them."""
    return [RewardTermSpec(t.name, t.weight, t.kwargs, t.alias, t.gate, t.on_error) for t in settings.recipe.reward.terms]


def policy_handle(engine: RolloutEngine, tokenizer, settings: RunSettings, seed: int,
                  generation_context: Callable | None = None) -> EnginePolicy:
    """The policy lent to rewards that generate (self-verification): the rollout's sampling and
    prompt template, seeded by `seed` (one batched call each)."""
    data = settings.recipe.data
    return EnginePolicy(engine, tokenizer, template=data.template, system_prompt=data.system_prompt,
                        prompt_suffix=data.prompt_suffix, sampling=settings.policy_sampling(), seed=seed,
                        generation_context=generation_context)
