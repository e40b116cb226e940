"""What a run measures and how it reacts: `logging`, `eval`, `dynamics`, `collapse`."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from urlvr.recipe.names import Registered
from urlvr.recipe.variants import VariantOf
from urlvr.registry import repeated
from urlvr.section import RegisteredSection, Section
from urlvr.recipe.sections.data import DataSource


class WandbSection(Section):
    """The old spelling `logging.wandb: {enabled: true, ...}`, still read: switched on, it becomes
    the tracker `{name: wandb, ...}` of `logging.trackers`."""

    enabled: bool = False
    """Log to Weights & Biases."""
    project: str = "urlvr"
    """`WandbTracker.project`."""
    entity: str | None = None
    """`WandbTracker.entity`."""
    mode: Literal["auto", "online", "offline"] = "auto"
    """`WandbTracker.mode`."""

    @model_validator(mode="after")
    def _knobs_need_wandb(self) -> WandbSection:
        changed = self.changed("project", "entity", "mode")
        if changed and not self.enabled:
            raise ValueError(f"{changed[0]} is set but wandb is off: add enabled: true, or drop it "
                             "(the tracker is now written `logging.trackers: [{name: wandb, ...}]`)")
        return self


class TensorBoardSection(Section):
    """The old spelling `logging.tensorboard: {enabled: true, ...}`, still read: switched on, it
    becomes the tracker `{name: tensorboard, ...}` of `logging.trackers`."""

    enabled: bool = False
    """Write TensorBoard event files."""
    log_dir: str | None = None
    """`TensorBoardTracker.log_dir`."""

    @model_validator(mode="after")
    def _folder_needs_tensorboard(self) -> TensorBoardSection:
        if self.log_dir is not None and not self.enabled:
            raise ValueError("log_dir is set but tensorboard is off: add enabled: true, or drop it "
                             "(the tracker is now written `logging.trackers: [{name: tensorboard, ...}]`)")
        return self


class _OldTrackerSpelling(Section):
    wandb: WandbSection | None = None
    """`logging.wandb` as an older recipe writes it."""
    tensorboard: TensorBoardSection | None = None
    """`logging.tensorboard` as an older recipe writes it."""

    def trackers(self) -> list[dict[str, Any]]:
        """The `logging.trackers` items the switched-on old sections stand for."""
        old = {"wandb": self.wandb, "tensorboard": self.tensorboard}
        return [{"name": name, **section.model_dump(exclude={"enabled"})}
                for name, section in old.items() if section is not None and section.enabled]


def tracker_spelling(logging: dict[str, Any]) -> dict[str, Any]:
    """`logging` (plain data) with `wandb: {enabled: true, ...}` and `tensorboard: {enabled: true, ...}`
    (the spelling before trackers were registered parts) turned into items of `trackers`; switched
    off they add nothing (a resolved recipe of an older urlvr writes both). A ValidationError for a
    bad old section (`project` set with wandb off)."""
    if not {"wandb", "tensorboard"} & logging.keys():
        return logging
    old = _OldTrackerSpelling.model_validate({k: logging[k] for k in ("wandb", "tensorboard") if k in logging})
    rest = {k: v for k, v in logging.items() if k not in ("wandb", "tensorboard")}
    given = rest.get("trackers", [])
    if not isinstance(given, (list, tuple)):  # null, a name, a mapping: left for the field's own "a valid list" error
        return {**rest, "trackers": given}
    return {**rest, "trackers": [*given, *old.trackers()]}


# An experiment tracker is a registered part with its own section (`urlvr.metrics.loggers`; plugins add more).
Tracker = Annotated[RegisteredSection, VariantOf("tracker", default=None)]


class LoggingSection(Section):
    console: bool = True
    """Rich progress bar and per-step line on the console."""
    completions_per_step: int = Field(4, ge=0)
    """Sample completions written to `completions.jsonl` each step (0 = none)."""
    trackers: list[Tracker] = Field(default_factory=list)
    """Experiment trackers that receive every step's metrics and every evaluation, beside the run
    folder's own `metrics.jsonl`: each a registered name or `{name: ..., knobs}`, e.g.
    `[{name: wandb, project: mine}, tensorboard]`; [] = none."""

    old_spellings: ClassVar[dict[str, type[Section]]] = {"wandb": WandbSection, "tensorboard": TensorBoardSection}
    # the sections `tracker_spelling` still reads, by key (load-time error messages list their fields)

    @model_validator(mode="before")
    @classmethod
    def _old_tracker_spelling(cls, data: Any) -> Any:
        return tracker_spelling(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _each_tracker_once(self) -> LoggingSection:
        twice = repeated(tracker.name for tracker in self.trackers)
        if twice:
            raise ValueError(f"trackers: {', '.join(twice)} given twice (one run, one tracker of each name)")
        return self


class EvalSection(Section):
    """Its knobs act only when an evaluation runs (`every_steps`, `at_start`, `at_end`, or `mode:
    test_time`); set away from their defaults without one, they are refused."""

    every_steps: int = Field(0, ge=0)
    """Evaluate every K steps (0 = never during training)."""
    at_start: bool = False
    """Evaluate before step 1 (the baseline)."""
    at_end: bool = False
    """Evaluate after the last step."""
    source: DataSource | None = None
    """Evaluation prompts (needs labels); null = no evaluation."""
    samples_per_prompt: int = Field(32, ge=1)
    """k for avg@k / maj@k (paper: 32)."""
    temperature: float = Field(0.6, gt=0.0, le=10.0)
    """Evaluation sampling temperature (paper: 0.6)."""
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    """Evaluation nucleus threshold (paper: 0.95)."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Response budget; null = rollout.max_new_tokens."""
    greedy: bool = True
    """Also decode each prompt greedily once and report `greedy_accuracy`."""
    judge: Annotated[str, Registered("reward")] | None = None
    """A registered reward that decides whether an evaluation sample is correct (score > 0.5),
    for tasks where an answer is not a string to compare with the label: `countdown` (an
    expression must use the numbers and reach the target). null = the extracted answer equals
    the label. Reported as `avg@k` etc. like the default; a time-limited judge (`math_verify`)
    counts a verdict that ran out of time as incorrect and reports the count as `judge_timeouts`."""
    held_out: dict[str, DataSource] = Field(default_factory=dict)
    """More labelled sets evaluated at the same times as `source`, by name; logged as
    `eval/<name>/avg@k` etc. (e.g. the held-out benchmarks of a test-time run)."""

    @model_validator(mode="after")
    def _needs_source(self) -> EvalSection:
        if self.scheduled and self.source is None:
            raise ValueError("evaluation is switched on but eval.source is not set")
        return self

    @property
    def scheduled(self) -> bool:
        """Whether an evaluation runs at all (`mode: test_time` also switches it on: see Recipe)."""
        return bool(self.every_steps or self.at_start or self.at_end)

    def unused_knobs(self) -> list[str]:
        """The knobs set away from their defaults, which act only when an evaluation runs."""
        return self.changed("source", "held_out", "samples_per_prompt", "temperature", "top_p", "max_new_tokens",
                            "greedy", "judge")


class DynamicsSection(Section):
    kl_to_initial_every: int = Field(0, ge=0)
    """Log `actor/kl_to_initial` (k3 estimate of KL(pi || pi_0) per response token) every K steps,
    even with `algorithm.kl_coef` 0, by scoring the batch with a frozen copy of the initial model.
    0 = only when the KL penalty is on (then every step, at no extra cost; a K is refused there)."""
    kl_reference_device: Literal["auto", "cpu"] = "auto"
    """Where that frozen copy lives when the KL penalty is off: `auto` = the training device,
    `cpu` = host memory (saves accelerator memory; slower). With a penalty the penalty's
    reference model is reused. Under `model.lora` there is no copy (the reference is the actor
    with its adapters off). `cpu` is refused where there is no copy to place."""
    repetition_ngram: int = Field(4, ge=1, le=64)
    """n of `response/repetition_rate` = 1 - unique n-grams / n-grams of a response's tokens."""
    track_prompts: list[str] | Literal["all"] | None = None
    """Per-prompt tracking (paper Fig. 4) into `prompts.jsonl`: a list of training prompt ids,
    `all`, or null (off). Each step records the tracked prompts of the batch (p_maj, majority
    answer and its correctness, whether the highest-reward sample is right)."""
    greedy_every: int = Field(0, ge=0)
    """Greedy-decode every tracked prompt every K steps and before step 1 (answer, correctness,
    confidence); 0 = off. Costs one generation per tracked prompt."""
    token_metrics: list[Annotated[str, Registered("token_statistic")]] = Field(
        default_factory=lambda: ["entropy", "self_certainty"])
    """Token statistics (registry `token statistic`) whose mean over response tokens is logged as
    `actor/<name>_mean` every step. Each one is computed in the scoring pass only if some part of the
    run asks for it; `[]` leaves a majority-vote run with log-probs only."""

    @model_validator(mode="after")
    def _greedy_needs_prompts(self) -> DynamicsSection:
        if self.greedy_every and not self.track_prompts:
            raise ValueError("greedy_every needs track_prompts (a list of prompt ids or `all`)")
        return self


class DetectorSpec(Section):
    name: Annotated[str, Registered("collapse_detector")]
    """A registered collapse detector (or a plugin's; docs/dynamics.md describes each)."""
    threshold: float | None = None
    """The detector's limit (absolute, or a fraction of its starting value for the relative
    ones); null = the detector's default (docs/dynamics.md lists them)."""
    window: int = Field(5, ge=1, le=10_000)
    """Steps in the trailing mean compared with the limit (and in the baseline of relative detectors)."""


def _default_detectors() -> list[DetectorSpec]:
    names = ("proxy_saturation", "entropy_collapse", "length_collapse", "repetition_growth", "kl_drift")
    return [DetectorSpec(name=n) for n in names]


class CollapseSection(Section):
    reward_accuracy_threshold: float = Field(0.01, ge=0.0, le=1.0)
    """Model Collapse Step (paper §6): the first step whose Reward Accuracy is below this (paper:
    1%); for certainty rewards, whose top-reward Label Accuracy is (docs/dynamics.md). Needs
    labels (metrics only) and `reward.oracle` (a value other than the default is refused without
    it, or for a reward that is neither a verdict nor a certainty); written to summary.json."""
    smoothing_window: int = Field(1, ge=1, le=10_000)
    """The collapse metric is averaged over this many trailing steps before the threshold; 1 = raw
    (paper). Needs the Model Collapse Step, as `reward_accuracy_threshold` does."""
    detectors: list[DetectorSpec] = Field(default_factory=_default_detectors)
    """Label-free early warnings, each firing once; [] = none."""
    action: Literal["warn", "stop", "checkpoint"] = "warn"
    """On an alarm (a detector, or the Model Collapse Step): `warn` prints and records it;
    `checkpoint` also saves a checkpoint then; `stop` saves one and ends the run, exporting the
    best checkpoint to `<output_dir>/best`."""
    best_metric: str | None = None
    """Metric that picks the best checkpoint (any logged key, `eval/...` included, e.g.
    `eval/maj@32`); null = the last checkpoint saved before the first alarm. That checkpoint
    is never pruned by `trainer.keep_last`."""
    best_mode: Literal["max", "min"] = "max"
    """Whether a larger or smaller `best_metric` is better (needs `best_metric`)."""

    @model_validator(mode="after")
    def _mode_needs_a_metric(self) -> CollapseSection:
        if self.changed("best_mode") and self.best_metric is None:
            raise ValueError(f"best_mode {self.best_mode} ranks best_metric, which is null (the best checkpoint is "
                             "then the last one before the first alarm): set best_metric or drop best_mode")
        return self
