"""RunSettings: everything a run derives from its recipe and world size, derived once.

Why one place: sampling parameters (training, evaluation, greedy probes, the policy handle),
the bound answer extractor, rows per mini-batch and DeepSpeed's accumulation steps, the seeds
and the token statistics the scoring pass computes must agree wherever they are used; each used
to be derived at its point of use. Everything else asks this object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from urlvr.algorithms.token_stats import BUILTIN_TOKEN_STATS, TOKEN_STATS
from urlvr.data.records import PromptRecord
from urlvr.dist import DistInfo, even_shard
from urlvr.metrics.collapse import COLLAPSE_DETECTORS
from urlvr.recipe import Recipe
from urlvr.rewards.base import REWARDS, RewardContext, RewardFamily
from urlvr.rewards.compose import reward_family
from urlvr.rewards.extractors import make_extractor, sample_answer
from urlvr.rollout.base import Group, Sample, SamplingParams, hashed_seed
from urlvr.trainer.sharding import RowLayout


@dataclass(frozen=True)
class RunSettings:
    recipe: Recipe
    rank: int
    world_size: int
    minibatches_per_step: int  # optimizer steps per rollout batch and epoch
    micro_steps_per_minibatch: int  # DeepSpeed's nominal accumulation steps (the loop marks each boundary itself)
    prompt_shard: range  # this rank's prompts: indices into each step's global batch (whole groups)
    prompts_per_round: int  # a dynamic-sampling round's global batch (prompts_per_step when off or unset)
    round_shard: range  # this rank's prompts of each round's global batch (whole groups)
    layout: RowLayout  # which rows of the global batch this rank scores and trains
    reward_stats: tuple[str, ...]  # token statistics the reward terms read (lent via ctx.token_stats)
    metric_stats: tuple[str, ...]  # token statistics logged as `actor/<name>_mean` (metrics, detectors)
    extract: Callable[[str], str | None]  # reward.extractor bound to its kwargs
    reward_family: tuple[RewardFamily, int | None]  # what the training reward claims (which label metrics apply)

    @classmethod
    def derive(cls, recipe: Recipe, dist: DistInfo) -> RunSettings:
        trainer, group_size = recipe.trainer, recipe.rollout.group_size
        if trainer.prompts_per_step < dist.world_size:
            raise ValueError(
                f"trainer.prompts_per_step ({trainer.prompts_per_step}) is smaller than the world size "
                f"({dist.world_size}): every rank generates at least one whole group; use fewer processes "
                "or more prompts per step"
            )
        sampling = recipe.rollout.dynamic_sampling
        per_round = sampling.round_size(trainer.prompts_per_step) if sampling.name != "none" else trainer.prompts_per_step
        if per_round < dist.world_size:
            raise ValueError(
                f"rollout.dynamic_sampling.prompts_per_round ({per_round}) is smaller than the world size "
                f"({dist.world_size}): every rank generates at least one whole group per round; use fewer "
                "processes or more prompts per round"
            )
        rows = trainer.prompts_per_minibatch * group_size
        layout = RowLayout(rows=trainer.prompts_per_step * group_size, rows_per_minibatch=rows,
                           micro_batch_size=trainer.micro_batch_size, world_size=dist.world_size, rank=dist.rank)
        reward_stats = _ordered(stat for term in recipe.reward.terms
                                for stat in REWARDS.get(term.name).token_stats(term.kwargs))
        detector_stats = (stat for spec in recipe.collapse.detectors for stat in COLLAPSE_DETECTORS.get(spec.name).stats)
        return cls(
            recipe=recipe, rank=dist.rank, world_size=dist.world_size,
            minibatches_per_step=trainer.prompts_per_step // trainer.prompts_per_minibatch,
            micro_steps_per_minibatch=layout.micro_steps_per_minibatch,
            prompt_shard=even_shard(trainer.prompts_per_step, dist.world_size, dist.rank), layout=layout,
            prompts_per_round=per_round, round_shard=even_shard(per_round, dist.world_size, dist.rank),
            reward_stats=reward_stats, metric_stats=_ordered([*recipe.dynamics.token_metrics, *detector_stats]),
            extract=make_extractor(recipe.reward.extractor, recipe.reward.extractor_kwargs),
            reward_family=reward_family([(t.name, t.weight) for t in recipe.reward.terms]),
        )

    # ------------------------------------------------------------------ the step's shape
    @property
    def group_size(self) -> int:
        """Samples trained per prompt (`rollout.group_size`)."""
        return self.recipe.rollout.group_size

    @property
    def vote_group_size(self) -> int:
        """Samples drawn per prompt: `reward.vote_group_size` (TTRL: more to vote than to train), else
        `group_size`; the first `group_size` of each are trained."""
        return self.recipe.reward.vote_group_size or self.group_size

    @property
    def optimizer_steps_per_rollout(self) -> int:
        """Optimizer steps each rollout batch feeds: mini-batches per step x `trainer.ppo_epochs`
        (1 = on-policy, Table 7)."""
        return self.minibatches_per_step * self.recipe.trainer.ppo_epochs

    @property
    def seed(self) -> int:
        """The run's seed: the process RNGs (`seed_everything`) and the prompt stream's shuffle. Rollouts
        and token filters draw from per-(step, prompt) seeds hashed from it (`sampling_seed`)."""
        return self.recipe.seed

    @property
    def own_rows(self) -> slice:
        """This rank's rows of each step's global batch: the whole groups of its prompts."""
        return slice(self.prompt_shard.start * self.group_size, self.prompt_shard.stop * self.group_size)

    @property
    def temperature(self) -> float:
        """The rollout's temperature, which every scoring forward applies to the logits."""
        return self.recipe.rollout.temperature

    @property
    def kl_penalty(self) -> bool:
        """Whether the loss has a KL term to pi_0 (`algorithm.kl_coef` > 0)."""
        return self.recipe.algorithm.kl_coef > 0

    @property
    def needs_reference(self) -> bool:
        """Whether the run holds pi_0 at all: a KL penalty, or KL to pi_0 measured (`dynamics.kl_to_initial_every`)."""
        return self.kl_penalty or self.recipe.dynamics.kl_to_initial_every > 0

    def measures_kl(self, step: int) -> bool:
        """Whether step `step` needs pi_0's log-probs: a KL penalty, or KL to pi_0 measured every
        `dynamics.kl_to_initial_every` steps (even without a penalty)."""
        every = self.recipe.dynamics.kl_to_initial_every
        return self.kl_penalty or (every > 0 and step % every == 0)

    # ------------------------------------------------------------------ token statistics
    @property
    def scoring_pass(self) -> bool:
        """Whether the no-grad scoring forward runs before the rewards. It must when a reward reads
        token statistics (rewards run before the update: nothing else has them yet), or when a
        rollout feeds more than one optimizer step (the second mini-batch, or epoch, trains a policy
        that no longer sampled the batch: its old log-probs must be measured before any update).
        Otherwise every training forward runs the rollout's policy on the micro-batches the scoring
        pass would see, so it stands in for it: its detached log-probs are the old log-probs (ratio
        exactly 1), and it also computes the statistics that are only logged (metrics, detectors).
        A token filter (`algorithm.token_filter`) also needs it: it selects tokens over the whole
        mini-batch before the update. So does LoRA dropout (`model.lora.dropout > 0`): the training
        forward then is not the policy that sampled, whose log-probs the ratio must divide by."""
        off_policy = self.optimizer_steps_per_rollout > 1
        lora = self.recipe.model.lora
        return (bool(self.reward_stats) or off_policy or self.recipe.algorithm.token_filter.name != "none"
                or (lora is not None and lora.dropout > 0))

    @property
    def score_stats(self) -> tuple[str, ...]:
        """What the scoring pass computes on temperature-scaled logits: old log-probs for the
        update, plus every statistic a reward, metric, detector or token filter declared -- nothing else."""
        return _ordered(["logprob", *self.reward_stats, *self.metric_stats, *self.recipe.algorithm.token_filter.stats()])

    @property
    def raw_score_stats(self) -> tuple[str, ...]:
        """The rewards' statistics again on the unscaled logits (`reward.certainty_logits: raw`),
        in the same pass, when the temperature makes them differ."""
        raw = self.recipe.reward.certainty_logits == "raw" and self.recipe.rollout.temperature != 1.0
        return self.reward_stats if raw else ()

    @property
    def train_stats(self) -> tuple[str, ...]:
        """What the training forward computes, with gradient: log-probs, entropy for an entropy bonus,
        and the statistics the loss declares (`PolicyLoss.stats()`, passed to it as `token_stats`)."""
        algo = self.recipe.algorithm
        return _ordered(["logprob", *(["entropy"] if algo.entropy_coef > 0 else []), *algo.loss.stats()])

    @property
    def logged_train_stats(self) -> tuple[str, ...]:
        """What the training forward adds without gradients when it stands in for the scoring pass:
        the metrics' and detectors' statistics it does not compute already."""
        return () if self.scoring_pass else tuple(n for n in self.metric_stats if n not in self.train_stats)

    # ------------------------------------------------------------------ sampling
    def sampling_seed(self, step: int, prompt_index: int) -> int:
        """A per-(step, prompt) seed, keyed by the prompt's index in the global batch: rollouts are
        reproducible, resume-exact without RNG replay, and the same on 1 rank or 8."""
        return hashed_seed(self.recipe.seed, step, prompt_index, bits=62)

    def token_filter_seed(self, step: int, epoch: int, first_row: int) -> int:
        """The seed of the token filter's draw over the mini-batch starting at row `first_row` of
        `step`'s global batch in `epoch`: the same on 1 rank or 8, and resume-exact."""
        return hashed_seed(self.recipe.seed, step, epoch, first_row)

    def shaping_seed(self, step: int) -> int:
        """The seed of `algorithm.advantage_shaping`'s draws at `step` (resume-exact, any world size)."""
        return hashed_seed(self.recipe.seed, step, "advantage_shaping")

    def first_prompt_index(self) -> int:
        """Global index of this rank's first prompt (ranks hold contiguous slices)."""
        return self.prompt_shard.start

    def train_sampling(self, step: int, num_prompts: int) -> SamplingParams:
        """The rollout's sampling for this rank's `num_prompts` prompts of `step`."""
        first = self.first_prompt_index()
        return SamplingParams(**self._rollout_fields(),
                              prompt_seeds=tuple(self.sampling_seed(step, first + i) for i in range(num_prompts)))

    def round_first_index(self, round_index: int) -> int:
        """Global index of this rank's first prompt in round `round_index` of dynamic sampling: a
        refill round's prompts continue the index after the earlier rounds' (round r holds r*R ..
        r*R + R - 1, R = `prompts_per_round`), so its seeds stay the same on 1 rank or 8. With
        R = prompts_per_step, round 0 is the step without dynamic sampling (same seeds)."""
        return round_index * self.prompts_per_round + self.round_shard.start

    def round_sampling(self, step: int, round_index: int, num_prompts: int) -> SamplingParams:
        """The rollout's sampling for round `round_index` of dynamic sampling (round 0 = `train_sampling`
        when `prompts_per_round` is the training batch)."""
        first = self.round_first_index(round_index)
        return SamplingParams(**self._rollout_fields(),
                              prompt_seeds=tuple(self.sampling_seed(step, first + i) for i in range(num_prompts)))

    def policy_sampling(self) -> SamplingParams:
        """The rollout's settings without seeds, for the policy handle lent to rewards (it seeds each call)."""
        return SamplingParams(**self._rollout_fields())

    def eval_sampling(self) -> SamplingParams:
        ev, rollout = self.recipe.eval, self.recipe.rollout
        return SamplingParams(temperature=ev.temperature, top_p=ev.top_p,
                              max_new_tokens=ev.max_new_tokens or rollout.max_new_tokens,
                              stop_token_ids=tuple(rollout.stop_token_ids), seed=self.recipe.seed + 17 * self.rank)

    def greedy_sampling(self) -> SamplingParams:
        rollout = self.recipe.rollout
        return SamplingParams(greedy=True, max_new_tokens=rollout.max_new_tokens,
                              stop_token_ids=tuple(rollout.stop_token_ids))

    def _rollout_fields(self) -> dict:
        rollout = self.recipe.rollout
        return {"temperature": rollout.temperature, "top_p": rollout.top_p, "top_k": rollout.top_k,
                "max_new_tokens": rollout.max_new_tokens, "stop_token_ids": tuple(rollout.stop_token_ids)}

    # ------------------------------------------------------------------ rewards
    def reward_context(self, group: Group, voters: Group, record: PromptRecord, response_mask: torch.Tensor,
                       token_stats: dict[str, torch.Tensor], tokenizer) -> RewardContext:
        """The context of one group: answers by the recipe's extractor (the voting-only samples of
        `voters` beyond the group add to `vote_answers`), the declared statistics, the record's
        label kept private (oracle rewards only)."""
        answers = [self.answer(s) for s in group.samples]
        extra = [self.answer(s) for s in voters.samples[group.size:]]
        return RewardContext.for_group(
            answers, response_mask, extract_answer=self.extract, token_stats=token_stats, label=record.label,
            metadata=record.metadata, question=record.prompt, tokenizer=tokenizer,
            vote_answers=answers + extra if extra else None)

    def answer(self, sample: Sample) -> str | None:
        """The sample's answer by the recipe's extractor; None for a truncated sample (finish
        reason `length`) unless `reward.answer_from_truncated`."""
        return sample_answer(sample, self.extract, from_truncated=self.recipe.reward.answer_from_truncated)

    def lent_stats(self, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The rewards' statistics, on raw logits where `reward.certainty_logits` asks."""
        return {name: stats.get(f"raw_{name}", stats[name]) for name in self.reward_stats}


def _ordered(names) -> tuple[str, ...]:
    """Unique registered names: built-ins in their canonical order, then plugins' as first seen."""
    seen = list(dict.fromkeys(names))
    for name in seen:
        if name not in TOKEN_STATS:
            raise ValueError(TOKEN_STATS.unknown_name_message(name))
    builtin = [n for n in BUILTIN_TOKEN_STATS if n in seen]
    return tuple(builtin + [n for n in seen if n not in builtin])
