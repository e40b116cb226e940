"""The recipe: pydantic sections, the single source of truth for a run's configuration.

Defaults are the paper's Table 7 (GRPO, temperature 1.0, 64 prompts per step, mini-batch 64 =
pure on-policy, 8 samples per prompt, no KL/entropy regularisation, lr 1e-6, 1 epoch, max prompt
1024 and response 7168 tokens). Every field carries a docstring (it becomes the JSON-schema
description and the docs' recipe reference) and bounds; unknown keys are refused.
Names of registered parts (rewards, losses, ...) are checked against their registries here, at
load time, so a typo fails before step 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from urlvr.recipe.names import check_registered


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


# --------------------------------------------------------------------------- model
class ModelSection(Section):
    path: str = "urlvr/tiny"
    """Local directory or hub id of a causal LM. `urlvr/tiny` is the embedded tiny model that
    urlvr ships (no download)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    attn_implementation: str | None = None
    """transformers attention backend (`sdpa`, `eager`, `flash_attention_2`); None = default."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint (needed by some hub models)."""


# --------------------------------------------------------------------------- data
class FileSource(Section):
    kind: Literal["file"] = "file"
    path: Path
    """A local .jsonl, .json or .parquet file of prompts."""
    prompt_field: str = "prompt"
    """Column holding the question."""
    label_field: str | None = "answer"
    """Column holding the ground-truth answer, or null. Labels feed metrics and oracle rewards
    only, never the training signal unless the recipe names an oracle reward."""
    id_field: str | None = None
    """Column with a stable prompt id; default `<file stem>-<row>`."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N rows."""

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Path) -> Path:
        if not path.is_file():
            raise ValueError(f"file not found: {path}")
        return path


class DatasetsSource(Section):
    kind: Literal["datasets"] = "datasets"
    name: str
    """A `datasets` hub id (networked machines) or a local directory (save_to_disk or data files)."""
    split: str = "train"
    """Split to read."""
    subset: str | None = None
    """Dataset configuration name, if any."""
    prompt_field: str = "prompt"
    """Column holding the question."""
    label_field: str | None = "answer"
    """Column holding the ground-truth answer, or null (metrics and oracle rewards only)."""
    id_field: str | None = None
    """Column with a stable prompt id; default `<name>-<row>`."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N rows."""


class AdapterSource(Section):
    kind: Literal["adapter"] = "adapter"
    dataset: str
    """A paper dataset by its adapter's name: dapo-17k, math-500, aime-2024, aime-2025, amc-2023,
    countdown-3to4 (docs/datasets.md; plugins may add more). The adapter knows the hub id, split,
    question and answer fields, answer normalisation and the paper's prompt template."""
    path: str | None = None
    """A local copy in the hub schema instead of the hub: a .jsonl/.json/.parquet file or a
    `datasets` directory (offline mirrors, test fixtures); null = download the adapter's hub id."""
    split: str | None = None
    """Split to read; null = the adapter's (a local file has only one)."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N rows (after the adapter's de-duplication)."""
    sample_size: int | None = Field(None, ge=1)
    """Draw N rows at random without replacement instead (paper §5.1's DAPO subsets, §7's 4k/1k
    Countdown split); null = all rows."""
    sample_seed: int = 0
    """Seed of the shuffle that `sample_size` draws from."""
    sample_offset: int = Field(0, ge=0)
    """Skip this many rows of the shuffled order first: the same seed with non-overlapping offsets
    gives disjoint subsets (e.g. train = offset 0, validation = offset 4000)."""

    @field_validator("dataset")
    @classmethod
    def _adapter_known(cls, name: str) -> str:
        return check_registered("dataset_adapter", name)

    @field_validator("path")
    @classmethod
    def _exists(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).exists():
            raise ValueError(f"path not found: {path}")
        return path

    @model_validator(mode="after")
    def _one_way_to_subset(self) -> AdapterSource:
        if self.limit is not None and self.sample_size is not None:
            raise ValueError("give limit or sample_size, not both")
        if self.sample_offset and self.sample_size is None:
            raise ValueError("sample_offset needs sample_size")
        return self


class ArithmeticSource(Section):
    kind: Literal["arithmetic"] = "arithmetic"
    num_problems: int = Field(256, ge=1, le=10_000_000)
    """How many synthetic two-operand arithmetic problems to generate."""
    seed: int = 0
    """Generator seed (the tiny model's warm-up used a different one: these are held out)."""


class CountdownSource(Section):
    kind: Literal["countdown"] = "countdown"
    num_problems: int = Field(256, ge=1, le=10_000_000)
    """How many synthetic Countdown problems (numbers + target) to generate."""
    seed: int = 0
    """Generator seed."""


DataSource = Annotated[
    Union[FileSource, DatasetsSource, AdapterSource, ArithmeticSource, CountdownSource], Field(discriminator="kind")
]


class DataSection(Section):
    source: DataSource = Field(default_factory=ArithmeticSource)
    """Where prompts come from; `kind` picks the variant: file | datasets | adapter | arithmetic | countdown."""
    template: str = "chat"
    """`chat` = the tokenizer's chat template; anything else is a plain format string with a
    single `{prompt}` field, e.g. `"Question: {prompt}\\nAnswer:"`."""
    system_prompt: str | None = None
    """Optional system message (chat template only)."""
    prompt_suffix: str = ""
    """Text appended to every question, e.g. an instruction to box the final answer."""
    max_prompt_length: int = Field(1024, ge=1)
    """Longest prompt in tokens (Table 7: 1024)."""
    on_long_prompt: Literal["error", "skip"] = "error"
    """What to do with a longer prompt: stop with an error naming it, or skip it (counted in the log)."""
    shuffle: bool = True
    """Shuffle prompts each epoch (seeded by the recipe's seed)."""


# --------------------------------------------------------------------------- rollout
class VLLMSection(Section):
    """The colocated vLLM engine: one in-process engine per training rank (docs/vllm.md)."""

    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)
    """Fraction of the GPU's memory vLLM may take (weights + KV cache); the actor shares the
    device, so keep room for its weights, gradients and optimizer states."""
    sleep: bool = True
    """Offload vLLM's weights and free its KV cache while the actor trains (sleep level 1), wake
    it for the next rollout. Platforms without sleep mode (CPU) log a line and keep the memory."""
    max_model_len: int | None = Field(None, ge=16)
    """Longest prompt + response vLLM plans its KV cache for; null = `data.max_prompt_length +
    rollout.max_new_tokens`, capped by the model's context length."""
    sync_bucket_mb: int = Field(256, ge=1)
    """Weight sync moves parameters in buckets of this many MiB (under ZeRO-3 each bucket is
    gathered, loaded and released before the next, so peak extra memory stays near one bucket)."""
    enforce_eager: bool = False
    """Disable CUDA graphs (slower decoding, faster start, less memory)."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes (the N samples of a group share the prompt).
    The cache is reset after every weight sync, so stale entries never serve a new policy."""
    max_num_batched_tokens: int | None = Field(None, ge=16)
    """vLLM scheduler budget per engine step; null = vLLM's default (on CPU: at least
    `max_model_len`, with chunked prefill off, which CPU sampling with seeds requires)."""
    cpu_kv_cache_gib: float = Field(1.0, gt=0.0)
    """KV cache size on the CPU backend, in GiB (sets `VLLM_CPU_KVCACHE_SPACE` if unset)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments passed verbatim to `vllm.LLM` (they win over the fields above)."""


class RolloutSection(Section):
    engine: str = "transformers"
    """Rollout engine by name (registry `rollout engine`)."""
    group_size: int = Field(8, ge=1, le=1024)
    """Samples per prompt, N (Table 7: 8)."""
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    """Sampling temperature (Table 7: 1.0). The trainer scores log-probs at the same temperature."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling threshold; 1.0 = off."""
    top_k: int = Field(0, ge=0)
    """Top-k filter; 0 = off."""
    max_new_tokens: int = Field(7168, ge=1)
    """Longest response in tokens (Table 7: 7168)."""
    stop_token_ids: list[int] = Field(default_factory=list)
    """Extra token ids that end a response (the tokenizer's eos always does)."""
    generation_batch_size: int = Field(64, ge=1)
    """Sequences generated together by the transformers engine (memory knob)."""
    vllm: VLLMSection = Field(default_factory=lambda: VLLMSection())
    """Settings of the `vllm` engine (ignored by the others)."""

    @field_validator("engine")
    @classmethod
    def _engine_known(cls, name: str) -> str:
        return check_registered("rollout_engine", name)


# --------------------------------------------------------------------------- reward
class RewardTerm(Section):
    name: str
    """A registered reward (`urlvr rewards` lists them)."""
    weight: float = 1.0
    """Weight of this term in the summed reward."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the reward function, checked against its signature at load time."""
    alias: str | None = None
    """Name of this term in metrics (`reward/<alias>_mean`); default the reward's name. Needed
    when one reward appears twice with different kwargs."""
    gate: str | None = None
    """A registered reward whose per-sample score multiplies this term's, e.g. `format` (1 when an
    answer was extracted) to zero a certainty reward on answerless samples; null = ungated."""
    on_error: Literal["raise", "zero"] = "raise"
    """If the reward raises: `raise` stops the run with a message naming the reward and the
    prompt; `zero` scores that group 0 and counts it (`reward/<term>/error_rate`). Never silent."""

    @model_validator(mode="after")
    def _known_and_kwargs_fit(self) -> RewardTerm:
        check_registered("reward", self.name)
        if self.gate is not None:
            check_registered("reward", self.gate)
        from urlvr.rewards.base import check_reward_kwargs

        check_reward_kwargs(self.name, self.kwargs)
        return self

    @property
    def key(self) -> str:
        return self.alias or self.name


class RewardSection(Section):
    terms: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="majority_vote")], min_length=1)
    """Reward terms; the training reward is their weighted sum."""
    extractor: str = "boxed"
    """Answer extractor by name (registry `extractor`), e.g. the last `\\boxed{...}`."""
    extractor_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the extractor, e.g. `{pattern: "Answer: (.*)"}` for `regex`."""
    oracle: str | None = "ground_truth"
    """Reward computed alongside for METRICS ONLY where labels exist (ground-truth reward,
    reward accuracy); null to skip. It never enters the training signal."""
    certainty_logits: Literal["scaled", "raw"] = "scaled"
    """Logits the certainty statistics lent to rewards are measured on: `scaled` = divided by the
    rollout temperature (the distribution the samples came from), `raw` = the model's own. They
    coincide at temperature 1.0 (the paper's). The update's log-probs are always `scaled`."""
    vote_group_size: int | None = Field(None, ge=1)
    """Samples drawn per prompt for voting rewards (majority vote, semantic cluster); the first
    `rollout.group_size` are trained, all of them vote (TTRL: 64 votes, 32 trained). null = group_size."""

    @field_validator("extractor")
    @classmethod
    def _extractor_known(cls, name: str) -> str:
        return check_registered("extractor", name)

    @field_validator("oracle")
    @classmethod
    def _oracle_known(cls, name: str | None) -> str | None:
        return None if name is None else check_registered("reward", name)

    @model_validator(mode="after")
    def _terms_unique_and_extractor_kwargs_fit(self) -> RewardSection:
        keys = [term.key for term in self.terms]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"reward term {repeated[0]!r} appears twice; give one an `alias`")
        from urlvr.rewards.extractors import make_extractor

        make_extractor(self.extractor, self.extractor_kwargs)
        return self


# --------------------------------------------------------------------------- algorithm
class AlgorithmSection(Section):
    advantage: str = "grpo"
    """Advantage estimator by name: `grpo` (group mean/std) or `dr_grpo` (mean only)."""
    advantage_eps: float = Field(1e-6, gt=0.0, le=1.0)
    """Added to the group std before dividing."""
    loss: str = "ppo_clip"
    """Policy loss by name."""
    clip_eps_low: float = Field(0.2, ge=0.0, le=1.0)
    """Lower clip range: ratio clipped at 1 - clip_eps_low."""
    clip_eps_high: float = Field(0.2, ge=0.0, le=10.0)
    """Upper clip range: ratio clipped at 1 + clip_eps_high (DAPO's clip-higher uses 0.28)."""
    dual_clip_c: float | None = Field(None, gt=1.0)
    """Dual-clip constant c > 1 bounding the loss for negative advantages; null = off."""
    loss_aggregation: str = "token-mean"
    """token-mean | seq-mean-token-mean | seq-mean-token-sum-norm (Dr.GRPO)."""
    kl_coef: float = Field(0.0, ge=0.0)
    """Weight of the KL penalty to the frozen initial policy (Table 7: none). >0 loads a reference model."""
    kl_estimator: str = "k3"
    """k1 | k2 | k3 (Schulman's estimators)."""
    entropy_coef: float = Field(0.0, ge=0.0)
    """Weight of the entropy bonus (Table 7: none)."""
    tis_cap: float | None = Field(None, ge=1.0)
    """Truncated importance sampling against sampler/trainer mismatch (vLLM's numerics differ
    from the trainer's): each token's loss is weighted by min(pi_trainer / pi_sampler, tis_cap),
    detached; null = off. The mismatch is measured every step either way (`rollout/logprob_mismatch_*`)."""

    @field_validator("advantage", "loss", "loss_aggregation", "kl_estimator")
    @classmethod
    def _registered(cls, name: str, info: ValidationInfo) -> str:
        return check_registered(_ALGORITHM_REGISTRIES[info.field_name], name)


_ALGORITHM_REGISTRIES = {  # AlgorithmSection field -> the registry its value must name
    "advantage": "advantage_estimator",
    "loss": "policy_loss",
    "loss_aggregation": "loss_aggregation",
    "kl_estimator": "kl_estimator",
}


# --------------------------------------------------------------------------- optim
class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage: 0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + parameters sharded."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision; bf16 keeps fp32 master weights in the optimizer."""
    offload_optimizer: bool = False
    """Keep optimizer state on the CPU (ZeRO 1-3)."""
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    """Raw DeepSpeed config keys merged last, for knobs urlvr does not model."""


class OptimSection(Section):
    lr: float = Field(1e-6, gt=0.0, le=1.0)
    """Peak learning rate (Table 7: 1e-6)."""
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    """AdamW weight decay (veRL's default)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = Field(1e-8, gt=0.0)
    """AdamW epsilon."""
    grad_clip: float | None = Field(1.0, gt=0.0)
    """Clip the global gradient norm to this; null = off."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up, in optimizer steps."""
    schedule: Literal["constant", "cosine"] = "constant"
    """LR schedule after warm-up."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Cosine floor as a fraction of lr."""
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    """DeepSpeed engine settings."""

    @field_validator("betas")
    @classmethod
    def _betas(cls, b: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= x < 1.0 for x in b):
            raise ValueError("each beta must lie in [0, 1)")
        return b


# --------------------------------------------------------------------------- trainer
class TrainerSection(Section):
    total_steps: int | None = Field(None, ge=1)
    """Rollout steps to run; null = as many as `data_epochs` passes over the prompts give."""
    data_epochs: int = Field(1, ge=1)
    """Passes over the prompt set when total_steps is null."""
    prompts_per_step: int = Field(64, ge=1)
    """Global batch: prompts rolled out per step, across all ranks (Table 7: 64)."""
    prompts_per_minibatch: int = Field(64, ge=1)
    """Prompts per optimizer step (Table 7: 64 = one update per rollout, pure on-policy)."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each rollout batch (Table 7: 1)."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward on each rank (gradient accumulation fills the mini-batch)."""
    save_every: int = Field(50, ge=0)
    """Checkpoint every K steps (and at the end); 0 = only at the end."""
    keep_last: int = Field(2, ge=1)
    """Checkpoints kept on disk; older ones are deleted after a newer one is complete."""
    export_final_model: bool = True
    """Write the trained model in HF format (safetensors + tokenizer) to `<output_dir>/final`."""

    @model_validator(mode="after")
    def _minibatches_divide(self) -> TrainerSection:
        if self.prompts_per_step % self.prompts_per_minibatch:
            raise ValueError(
                f"prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                f"prompts_per_minibatch ({self.prompts_per_minibatch})"
            )
        return self


# --------------------------------------------------------------------------- logging / eval
class WandbSection(Section):
    enabled: bool = False
    """Log to Weights & Biases (needs the `wandb` extra)."""
    project: str = "urlvr"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team)."""
    mode: Literal["auto", "online", "offline"] = "auto"
    """`auto` = online when WANDB_API_KEY is set, offline otherwise."""


class LoggingSection(Section):
    console: bool = True
    """Rich progress bar and per-step line on the console."""
    completions_per_step: int = Field(4, ge=0)
    """Sample completions written to `completions.jsonl` each step (0 = none)."""
    wandb: WandbSection = Field(default_factory=WandbSection)
    """Weights & Biases settings."""


class EvalSection(Section):
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
    held_out: dict[str, DataSource] = Field(default_factory=dict)
    """More labelled sets evaluated at the same times as `source`, by name; logged as
    `eval/<name>/avg@k` etc. (e.g. the held-out benchmarks of a test-time run)."""

    @model_validator(mode="after")
    def _needs_source(self) -> EvalSection:
        if (self.every_steps or self.at_start or self.at_end) and self.source is None:
            raise ValueError("evaluation is switched on but eval.source is not set")
        return self


# --------------------------------------------------------------------------- dynamics / collapse
class DynamicsSection(Section):
    kl_to_initial_every: int = Field(0, ge=0)
    """Log `actor/kl_to_initial` (k3 estimate of KL(pi || pi_0) per response token) every K steps,
    even with `algorithm.kl_coef` 0, by scoring the batch with a frozen copy of the initial model.
    0 = only when the KL penalty is on (then every step, at no extra cost)."""
    kl_reference_device: Literal["auto", "cpu"] = "auto"
    """Where that frozen copy lives when the KL penalty is off: `auto` = the training device,
    `cpu` = host memory (saves accelerator memory; slower). With a penalty the penalty's
    reference model is reused."""
    repetition_ngram: int = Field(4, ge=1, le=64)
    """n of `response/repetition_rate` = 1 - unique n-grams / n-grams of a response's tokens."""
    track_prompts: list[str] | Literal["all"] | None = None
    """Per-prompt tracking (paper Fig. 4) into `prompts.jsonl`: a list of training prompt ids,
    `all`, or null (off). Each step records the tracked prompts of the batch (p_maj, majority
    answer and its correctness, whether the highest-reward sample is right)."""
    greedy_every: int = Field(0, ge=0)
    """Greedy-decode every tracked prompt every K steps and before step 1 (answer, correctness,
    confidence); 0 = off. Costs one generation per tracked prompt."""

    @model_validator(mode="after")
    def _greedy_needs_prompts(self) -> DynamicsSection:
        if self.greedy_every and not self.track_prompts:
            raise ValueError("greedy_every needs track_prompts (a list of prompt ids or `all`)")
        return self


class DetectorSpec(Section):
    name: str
    """A registered collapse detector: proxy_saturation | entropy_collapse | length_collapse |
    repetition_growth | kl_drift (or a plugin's)."""
    threshold: float | None = None
    """The detector's limit (absolute, or a fraction of its starting value for the relative
    ones); null = the detector's default (docs/dynamics.md lists them)."""
    window: int = Field(5, ge=1, le=10_000)
    """Steps in the trailing mean compared with the limit (and in the baseline of relative detectors)."""

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        return check_registered("collapse_detector", name)


def _default_detectors() -> list[DetectorSpec]:
    names = ("proxy_saturation", "entropy_collapse", "length_collapse", "repetition_growth", "kl_drift")
    return [DetectorSpec(name=n) for n in names]


class CollapseSection(Section):
    reward_accuracy_threshold: float = Field(0.01, ge=0.0, le=1.0)
    """Model Collapse Step (paper §6): the first step whose Reward Accuracy is below this (paper:
    1%). Needs labels (metrics only); written to summary.json."""
    smoothing_window: int = Field(1, ge=1, le=10_000)
    """Reward Accuracy is averaged over this many trailing steps before the threshold; 1 = raw (paper)."""
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
    """Whether a larger or smaller `best_metric` is better."""


# --------------------------------------------------------------------------- the recipe
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
    def _micro_batch_fits(self) -> Recipe:
        samples = self.trainer.prompts_per_minibatch * self.rollout.group_size
        if self.trainer.micro_batch_size > samples:
            raise ValueError(
                f"trainer.micro_batch_size ({self.trainer.micro_batch_size}) exceeds the "
                f"sequences in one mini-batch ({samples} = prompts_per_minibatch x group_size)"
            )
        return self
