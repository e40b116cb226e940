"""The whole recipe: every section, plus the checks that span sections."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from urlvr.recipe.sections.data import DataSection
from urlvr.recipe.sections.generation import ModelSection, RolloutSection
from urlvr.recipe.sections.monitoring import LoggingSection, EvalSection, DynamicsSection, CollapseSection
from urlvr.recipe.sections.optimisation import AlgorithmSection, OptimSection, TrainerSection
from urlvr.recipe.sections.reward import RewardSection, reward_family
from urlvr.registry import registry
from urlvr.section import Section


class Recipe(Section):
    """A whole urlvr run."""

    seed: int = 0
    """Seeds data order, sampling and initialisation."""
    output_dir: Path = Path("runs/urlvr")
    """Run directory: resolved recipe, metrics.jsonl, completions, checkpoints, final model."""
    plugins: list[str] = Field(default_factory=list)
    """Importable module names that register extra rewards/losses/engines (imported first)."""
    model: ModelSection = Field(default_factory=ModelSection)
    """The policy to train."""
    data: DataSection = Field(default_factory=DataSection)
    """Training prompts and how they are templated."""
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    """Sampling of grouped responses."""
    reward: RewardSection = Field(default_factory=RewardSection)
    """Reward terms, answer extractor and the metrics-only oracle."""
    algorithm: AlgorithmSection = Field(default_factory=AlgorithmSection)
    """Advantage estimator, policy loss, aggregation, regularisation."""
    optim: OptimSection = Field(default_factory=OptimSection)
    """Optimizer, schedule and DeepSpeed."""
    trainer: TrainerSection = Field(default_factory=TrainerSection)
    """Batch sizes, steps and checkpoints."""
    logging: LoggingSection = Field(default_factory=LoggingSection)
    """Console, completions and wandb."""
    eval: EvalSection = Field(default_factory=EvalSection)
    """Periodic evaluation."""
    dynamics: DynamicsSection = Field(default_factory=DynamicsSection)
    """Extra training-dynamics measurements: KL to the initial policy, per-prompt tracking."""
    collapse: CollapseSection = Field(default_factory=CollapseSection)
    """Model Collapse Step, label-free collapse detectors and what to do when one fires."""
    mode: Literal["train", "test_time"] = "train"
    """`test_time`: train on the evaluation prompts themselves (`eval.source`; paper §5.2, safe
    up to ~128 prompts), evaluating them (and `eval.held_out`) before and after training.
    `data.source` must then be unset or equal to `eval.source`."""

    @model_validator(mode="after")
    def _test_time_trains_on_eval_prompts(self) -> Recipe:
        if self.mode != "test_time":
            return self
        if self.eval.source is None:
            raise ValueError("mode test_time trains on eval.source: set it")
        if "source" in self.data.model_fields_set and self.data.source != self.eval.source:
            raise ValueError("mode test_time trains on eval.source; leave data.source unset")
        for flag in ("at_start", "at_end"):
            if flag in self.eval.model_fields_set and not getattr(self.eval, flag):
                raise ValueError(f"mode test_time evaluates before and after training; eval.{flag} cannot be false")
        self.data.source = self.eval.source
        self.eval.at_start = self.eval.at_end = True
        return self

    @model_validator(mode="after")
    def _vote_group_covers_group(self) -> Recipe:
        votes = self.reward.vote_group_size
        if votes is not None and votes < self.rollout.group_size:
            raise ValueError(f"reward.vote_group_size ({votes}) must be >= rollout.group_size ({self.rollout.group_size})")
        return self

    @model_validator(mode="after")
    def _reward_kwargs_fit_the_group(self) -> Recipe:
        """A reward's optional `check_group(group_size=, vote_group_size=, **kwargs)` and
        `check_rollout(max_new_tokens=, **kwargs)` refuse, at load time, knobs that cannot work or
        would do nothing with this recipe's group or response budget (scope's subgroup_size must
        divide the group; evol_rl's novelty needs 3 samples; overlong_penalty's ramp must start
        below rollout.max_new_tokens), not at step 1."""
        rewards = registry("reward")
        for term in self.reward.terms:
            fn = rewards.get(term.name).fn
            check = getattr(fn, "check_group", None)
            if check is not None:
                check(group_size=self.rollout.group_size, vote_group_size=self.reward.vote_group_size, **term.kwargs)
            check = getattr(fn, "check_rollout", None)
            if check is not None:
                check(max_new_tokens=self.rollout.max_new_tokens, **term.kwargs)
        return self

    @model_validator(mode="after")
    def _dynamic_sampling_counts_steps(self) -> Recipe:
        if self.rollout.dynamic_sampling.name != "none" and self.trainer.total_steps is None:
            raise ValueError("rollout.dynamic_sampling draws a varying number of prompts per step, so "
                             "trainer.data_epochs cannot say how many steps there are: set trainer.total_steps "
                             "(the prompt stream then cycles through its epochs)")
        return self

    @model_validator(mode="after")
    def _dynamic_sampling_rounds_fill_a_step(self) -> Recipe:
        sampling, quota = self.rollout.dynamic_sampling, self.trainer.prompts_per_step
        per_round = getattr(sampling, "prompts_per_round", None)
        if per_round is None:
            return self
        # the filter chooses only when the rounds can draw more groups than a step trains: at exactly
        # prompts_per_step every drawn group trains (the flat ones refill the step), as with `none`
        drawn, rounds_needed, round_needed = sampling.max_rounds * per_round, quota // per_round + 1, \
            quota // sampling.max_rounds + 1
        if drawn < quota:
            raise ValueError(
                f"rollout.dynamic_sampling: max_rounds ({sampling.max_rounds}) x prompts_per_round ({per_round}) "
                f"draws fewer prompts than trainer.prompts_per_step ({quota}), so a step could not be filled and "
                f"nothing chosen: raise max_rounds to {rounds_needed} or prompts_per_round to {round_needed}")
        if drawn == quota:
            raise ValueError(
                f"rollout.dynamic_sampling: max_rounds ({sampling.max_rounds}) x prompts_per_round ({per_round}) "
                f"= trainer.prompts_per_step ({quota}) never chooses: every drawn group trains, as with dynamic_sampling "
                f"none: raise max_rounds to {rounds_needed} or prompts_per_round to {round_needed}")
        return self

    @model_validator(mode="after")
    def _staleness_needs_an_engine_apart(self) -> Recipe:
        k = self.trainer.max_staleness
        if k and not getattr(type(self.rollout.engine), "overlaps_training", False):
            raise ValueError(f"trainer.max_staleness {k} needs an engine that samples apart from the trainer (rollout."
                             f"engine: server); {self.rollout.engine.name} samples between updates, so nothing would "
                             "overlap: use the server engine or set max_staleness: 0")
        if k and self.rollout.dynamic_sampling.name != "none":
            raise ValueError(f"trainer.max_staleness {k} with rollout.dynamic_sampling is not supported yet (its refill "
                             "rounds depend on the rewards of the step's own rollout): set one of them off")
        return self

    @model_validator(mode="after")
    def _micro_batch_fits(self) -> Recipe:
        samples = self.trainer.prompts_per_minibatch * self.rollout.group_size
        if self.trainer.micro_batch_size > samples and self.trainer.max_tokens_per_micro_batch is None:
            raise ValueError(
                f"trainer.micro_batch_size ({self.trainer.micro_batch_size}) exceeds the "
                f"sequences in one mini-batch ({samples} = prompts_per_minibatch x group_size)"
            )
        return self

    @model_validator(mode="after")
    def _lora_has_no_norms_to_spare(self) -> Recipe:
        if self.model.lora is not None and self.optim.weight_decay_exclude != "none":
            raise ValueError(f"optim.weight_decay_exclude: {self.optim.weight_decay_exclude} changes nothing "
                             "under model.lora: only the adapters train, and they are all matrices (the "
                             "frozen norms and biases never reach the optimizer); use weight_decay_exclude: none")
        return self

    # ---------------------------------------------------------------- knobs that would do nothing
    # A recipe knob acts, measurably, on every path it is accepted on; where a combination makes one
    # inert it is refused here, naming the combination (values only: see Section.changed).

    @model_validator(mode="after")
    def _eval_knobs_need_an_evaluation(self) -> Recipe:
        unused = self.eval.unused_knobs()
        if unused and not (self.eval.scheduled or self.mode == "test_time"):
            raise ValueError(f"eval.{unused[0]} is set but no evaluation runs (eval.every_steps 0, at_start and "
                             "at_end false): switch one on, or drop it")
        return self

    @model_validator(mode="after")
    def _kl_knobs_need_their_kl(self) -> Recipe:
        algo, dynamics = self.algorithm, self.dynamics
        if algo.kl_coef == 0 and algo.changed("kl_estimator"):
            raise ValueError(f"algorithm.kl_estimator {algo.kl_estimator} estimates the KL penalty, which is off "
                             "(algorithm.kl_coef 0; actor/kl_to_initial is always k3): set kl_coef or drop it")
        if algo.kl_coef > 0 and dynamics.kl_to_initial_every:
            raise ValueError(f"dynamics.kl_to_initial_every ({dynamics.kl_to_initial_every}): with algorithm.kl_coef > 0 "
                             "actor/kl_to_initial is logged every step anyway: drop it")
        if dynamics.kl_reference_device == "cpu":
            why = ("with algorithm.kl_coef > 0 (the penalty's reference, on the training device, serves)"
                   if algo.kl_coef > 0 else "under model.lora (the reference is the actor with its adapters off)"
                   if self.model.lora else "when no KL is measured (dynamics.kl_to_initial_every 0, algorithm.kl_coef 0)"
                   if not dynamics.kl_to_initial_every else None)
            if why:
                raise ValueError(f"dynamics.kl_reference_device cpu places the KL-to-initial metric's own copy of the "
                                 f"model; there is no such copy {why}: drop it")
        return self

    @model_validator(mode="after")
    def _advantage_eps_needs_a_std(self) -> Recipe:
        estimator = registry("advantage_estimator").get(self.algorithm.advantage)
        if self.algorithm.changed("advantage_eps") and not getattr(estimator, "uses_eps", True):
            raise ValueError(f"algorithm.advantage_eps is added to the group std, and advantage "
                             f"{self.algorithm.advantage} does not divide by it: drop advantage_eps")
        return self

    @model_validator(mode="after")
    def _advantage_shaping_fits_the_recipe(self) -> Recipe:
        """An advantage shaping's optional `check_recipe(recipe)` refuses, at load time, what it cannot
        work with or would leave inert (restrain: a reward besides the vote, the vote's own knobs,
        dynamic sampling)."""
        check = getattr(self.algorithm.advantage_shaping, "check_recipe", None)
        if check is not None:
            check(self)
        return self

    @model_validator(mode="after")
    def _ratio_knobs_need_a_ratio(self) -> Recipe:
        trainer, lora, loss = self.trainer, self.model.lora, self.algorithm.loss
        on_policy = trainer.prompts_per_step == trainer.prompts_per_minibatch and trainer.ppo_epochs == 1
        changed = loss.changed(*getattr(loss, "ratio_knobs", ()))
        if changed and on_policy and not (lora is not None and lora.dropout > 0):
            raise ValueError(f"algorithm.loss.{changed[0]} acts on the importance ratio, which is exactly 1 in an "
                             "on-policy recipe (trainer.prompts_per_minibatch = prompts_per_step, ppo_epochs 1): "
                             "drop it, or train several mini-batches or epochs per rollout")
        return self

    @model_validator(mode="after")
    def _raw_certainty_needs_a_difference(self) -> Recipe:
        if self.reward.certainty_logits != "raw":
            return self
        if self.rollout.temperature == 1.0:
            raise ValueError("reward.certainty_logits raw equals scaled at rollout.temperature 1.0 (the logits are "
                             "divided by 1): drop it")
        rewards = registry("reward")
        if not any(rewards.get(term.name).token_stats(term.kwargs) for term in self.reward.terms):
            raise ValueError("reward.certainty_logits raw applies to the token statistics a reward reads, and no "
                             "reward term reads any: drop it")
        return self

    @model_validator(mode="after")
    def _merged_export_needs_an_export(self) -> Recipe:
        lora = self.model.lora
        if lora is not None and lora.export_merged and not self.trainer.export_final_model \
                and self.collapse.action != "stop":
            raise ValueError("model.lora.export_merged: nothing is exported (trainer.export_final_model false, and "
                             "collapse.action is not stop, which exports the best checkpoint): drop one")
        return self

    @model_validator(mode="after")
    def _collapse_knobs_need_a_signal(self) -> Recipe:
        collapse, oracle = self.collapse, self.reward.oracle
        family, _ = reward_family([(term.name, term.weight) for term in self.reward.terms])
        unmeasured = ("reward.oracle is null" if oracle is None else f"the training reward's family is {family}, "
                      "neither a verdict nor a certainty" if family not in ("verdict", "certainty") else None)
        changed = collapse.changed("reward_accuracy_threshold", "smoothing_window")
        if changed and unmeasured:
            raise ValueError(f"collapse.{changed[0]} applies to the Model Collapse Step, which this recipe never "
                             f"measures ({unmeasured}): drop it")
        if collapse.changed("action") and not collapse.detectors and unmeasured:
            raise ValueError(f"collapse.action {collapse.action}: nothing can raise an alarm (collapse.detectors is "
                             f"empty, and no Model Collapse Step: {unmeasured}): drop it")
        return self
