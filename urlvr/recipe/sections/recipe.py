"""The whole recipe: every section, plus the checks that span sections."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from urlvr.recipe.sections.base import Section
from urlvr.recipe.sections.data import DataSection
from urlvr.recipe.sections.generation import ModelSection, RolloutSection
from urlvr.recipe.sections.monitoring import LoggingSection, EvalSection, DynamicsSection, CollapseSection
from urlvr.recipe.sections.optimisation import AlgorithmSection, OptimSection, TrainerSection
from urlvr.recipe.sections.reward import RewardSection


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
        if per_round is not None and sampling.max_rounds * per_round < quota:
            raise ValueError(
                f"rollout.dynamic_sampling: max_rounds ({sampling.max_rounds}) x prompts_per_round ({per_round}) "
                f"draws fewer prompts than trainer.prompts_per_step ({quota}), so a step could not be filled: "
                f"raise max_rounds to {-(-quota // per_round)} or prompts_per_round to {-(-quota // sampling.max_rounds)}")
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
