"""How the update is made and scheduled: `algorithm`, `optim` (incl. `deepspeed`), `trainer`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from urlvr.recipe.names import Registered
from urlvr.registry import registry
from urlvr.section import Section, VariantSection
from urlvr.recipe.variants import VariantOf


class AlgorithmSection(Section):
    advantage: Annotated[str, Registered("advantage_estimator")] = "grpo"
    """Advantage estimator by name (`grpo`: group mean and std; `dr_grpo`: mean only; `rloo`:
    leave-one-out mean; docs/algorithms.md)."""
    advantage_eps: float = Field(1e-6, gt=0.0, le=1.0)
    """Added to the group std before dividing (`grpo`; an estimator without a std, `dr_grpo` or
    `rloo`, refuses a non-default value)."""
    advantage_shaping: Annotated[VariantSection, VariantOf("advantage_shaper", default="none")] = "none"
    """What acts on the advantages after the estimator, with per-prompt state across steps (saved
    with checkpoints): `none`, `ttrl_guard` (TTRL-Guard, arXiv 2605.19444: flip-rate scaling,
    minority bonus, risky-update skipping) or `restrain` (RESTRAIN, arXiv 2510.02172: pseudo-label
    weighting, negative rollout penalisation, prompt weights from the starting model); their knobs
    below, docs/rewards.md. Logs its metrics under `ttrl_guard/` or `restrain/`."""
    loss: Annotated[VariantSection, VariantOf("policy_loss", default="ppo_clip")] = "ppo_clip"
    """Policy loss: a registered name, or a mapping `{name: ..., <its own knobs>}` (each loss's
    section is listed below; `ppo_clip` is PPO's clipped surrogate with clip-higher and dual clip,
    `gspo`/`gspo_token` clip a sequence ratio, `cispo` clips a stop-gradient IS weight). Clip
    ranges act on the importance ratio, exactly 1 in an on-policy recipe: there a non-default
    one is refused (unless LoRA dropout moves the ratio)."""
    loss_aggregation: Annotated[str, Registered("loss_aggregation")] = "token-mean"
    """How per-token losses are weighted into the mini-batch loss (`seq-mean-token-sum-norm` is Dr.GRPO's).
    A loss defined with particular modes only (`gspo`/`gspo_token`: `seq-mean-token-mean`; `cispo`:
    `token-mean`) refuses any other, and when this is not written it gets the loss's own mode."""
    token_filter: Annotated[VariantSection, VariantOf("token_filter", default="none")] = "none"
    """Entropy control: which tokens train, chosen once per mini-batch and applied to any loss
    (`high_entropy`: top-q entropy tokens only; `clip_cov`/`kl_cov`: Cui et al.'s covariance controls)."""
    mask_truncated: bool = False
    """DAPO's overlong filtering (Yu et al. 2025, Sec. 3.4): responses cut at `rollout.max_new_tokens`
    (finish reason `length`) leave the update -- no loss, no KL or entropy term, and their tokens
    leave the token normaliser of `token-mean` (the seq-mean modes still count the row in N). They
    still count in their group's advantage baseline. Pair with the `overlong_penalty` reward or use
    instead of it."""
    kl_coef: float = Field(0.0, ge=0.0)
    """Weight of the KL penalty to the frozen initial policy (Table 7: none). >0 loads a reference model
    (under `model.lora`: none, the actor with its adapters off is the reference)."""
    kl_estimator: Annotated[str, Registered("kl_estimator")] = "k3"
    """KL estimator of the penalty (Schulman's k2 or k3; k1 is refused: as a loss term its expected
    gradient is zero). k2's gradient is that of KL(π‖π_ref), k3's that of KL(π_ref‖π) (docs/concepts.md).
    Needs `kl_coef` > 0 (the KL-to-initial metric is always k3)."""
    entropy_coef: float = Field(0.0, ge=0.0)
    """Weight of the entropy bonus (Table 7: none)."""
    mismatch: Annotated[VariantSection, VariantOf("mismatch_correction", default="none")] = "none"
    """Importance weights against sampler/trainer mismatch (vLLM's numerics differ from the
    trainer's), fixed per step and detached: `token_tis` (min(π_trainer/π_sampler, cap) per token),
    `seq_tis` (per response), `seq_mis` (responses outside a ratio band dropped); `none` = off.
    The mismatch is measured every step either way (`rollout/logprob_mismatch_*`)."""

    @model_validator(mode="before")
    @classmethod
    def _moved_loss_knobs(cls, data: Any) -> Any:
        moved = sorted(k for k in ("clip_eps_low", "clip_eps_high", "dual_clip_c") if isinstance(data, dict) and k in data)
        if moved:
            knobs = ", ".join(f"{k}: {data[k]}" for k in moved)
            raise ValueError(f"{', '.join(moved)} moved into the loss's own section: write `loss: {{name: ppo_clip, "
                             f"{knobs}}}` (--set 'algorithm.loss={{name: ppo_clip, {knobs}}}')")
        if isinstance(data, dict) and "tis_cap" in data:
            cap = data["tis_cap"]
            raise ValueError(f"tis_cap moved to `mismatch: {{name: token_tis, cap: {cap}}}` "
                             f"(--set 'algorithm.mismatch={{name: token_tis, cap: {cap}}}')")
        return data

    @model_validator(mode="before")
    @classmethod
    def _aggregation_of_the_loss(cls, data: Any) -> Any:
        """An unwritten `loss_aggregation` is the loss's own (`gspo` alone under the field's default
        token-mean would silently train another objective)."""
        if not isinstance(data, dict) or "loss_aggregation" in data:
            return data
        allowed = _loss_aggregations(data.get("loss", "ppo_clip"))
        return {**data, "loss_aggregation": allowed[0]} if allowed else data

    @model_validator(mode="after")
    def _loss_defined_with_its_aggregation(self) -> AlgorithmSection:
        allowed = getattr(self.loss, "aggregations", None)
        if allowed is not None and self.loss_aggregation not in allowed:
            raise ValueError(f"loss {self.loss.name} is defined with loss_aggregation {' or '.join(allowed)} only; "
                             f"loss_aggregation {self.loss_aggregation} would train another objective: "
                             f"set loss_aggregation: {allowed[0]} (or drop it)")
        return self

    @field_validator("kl_estimator")
    @classmethod
    def _differentiable_kl(cls, name: str) -> str:
        if getattr(registry("kl_estimator").get(name), "loss_gradient", "") is None:
            raise ValueError(f"kl_estimator {name!r} cannot be a loss term: its expected gradient on samples "
                             "from the policy is zero, so it never pulls towards the reference; use k2 "
                             "(gradient of KL(π‖π_ref)) or k3 (gradient of KL(π_ref‖π))")
        return name


def _loss_aggregations(loss: Any) -> tuple[str, ...] | None:
    """The aggregations the loss written as `loss` declares (None: any, or not a registered loss:
    the loss field's own validation reports that)."""
    name = loss.get("name", "ppo_clip") if isinstance(loss, Mapping) else getattr(loss, "name", loss)
    losses = registry("policy_loss")
    return getattr(losses.get(name), "aggregations", None) if isinstance(name, str) and name in losses else None


class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage: 0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + parameters sharded."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision; bf16 keeps fp32 master weights in the optimizer."""
    offload_optimizer: bool = False
    """Keep optimizer state on the CPU (ZeRO 1-3; refused at stage 0, where nothing is offloaded)."""
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    """Raw DeepSpeed config keys merged last, for knobs urlvr does not model (a key that a recipe
    field sets, e.g. `gradient_clipping` = `optim.grad_clip`, is refused: one of the two would
    silently lose)."""

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedSection:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3: DeepSpeed offloads ZeRO's optimizer "
                             "partitions, and at stage 0 the optimizer state stays on the device")
        return self

    @model_validator(mode="after")
    def _overrides_model_no_field(self) -> DeepSpeedSection:
        zero = self.config_overrides.get("zero_optimization")
        keys = [*self.config_overrides, *(f"zero_optimization.{k}" for k in zero or {} if isinstance(zero, dict))]
        for key in keys:
            if key in _MODELLED_DEEPSPEED_KEYS:
                raise ValueError(f"config_overrides.{key} is set by {_MODELLED_DEEPSPEED_KEYS[key]}: use that "
                                 "(an override would make the field do nothing, or contradict what urlvr assumes)")
        return self


# DeepSpeed config keys that urlvr writes from recipe fields (trainer/actor.py: deepspeed_config)
_MODELLED_DEEPSPEED_KEYS = {
    "zero_optimization.stage": "optim.deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "optim.deepspeed.offload_optimizer",
    "bf16": "optim.deepspeed.precision", "fp16": "optim.deepspeed.precision (fp32 or bf16)",
    "gradient_clipping": "optim.grad_clip",
    "activation_checkpointing": "model.gradient_checkpointing (DeepSpeed's section acts only in model code that "
                                "calls deepspeed.checkpointing, which transformers models do not)",
    "optimizer": "optim (urlvr builds AdamW from lr, betas, adam_eps, weight_decay)",
    "scheduler": "optim (warmup_steps, schedule, min_lr_ratio)",
    "train_micro_batch_size_per_gpu": "trainer (micro_batch_size or max_tokens_per_micro_batch)",
    "gradient_accumulation_steps": "trainer (prompts_per_minibatch; urlvr marks each accumulation boundary itself)",
    "train_batch_size": "trainer (prompts_per_minibatch x rollout.group_size)",
}


class OptimSection(Section):
    lr: float = Field(1e-6, gt=0.0, le=1.0)
    """Peak learning rate (Table 7: 1e-6)."""
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    """AdamW weight decay (veRL's default)."""
    weight_decay_exclude: Literal["none", "norms_and_biases"] = "none"
    """Parameters `weight_decay` spares. `none`: every trained parameter decays, norm gains and
    biases included -- veRL's single AdamW group, and so the paper's (the default, and what the
    paper recipes write out). `norms_and_biases`: parameters with fewer than 2 dimensions (norm
    gains, biases) get no decay -- nanoGPT's rule; HF Trainer (and so TRL) and OpenRLHF spare the
    same parameters by name. Embeddings and the LM head decay either way. Refused with
    `weight_decay: 0` (nothing to spare) and with `model.lora` (its adapters are all matrices)."""
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
    """Cosine floor as a fraction of lr (schedule `cosine` only)."""
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    """DeepSpeed engine settings."""

    @model_validator(mode="after")
    def _exclusion_needs_decay(self) -> OptimSection:
        if self.weight_decay == 0 and self.weight_decay_exclude != "none":
            raise ValueError(f"weight_decay_exclude: {self.weight_decay_exclude} spares parameters from a "
                             "weight decay of 0, which changes nothing: set weight_decay > 0 or "
                             "weight_decay_exclude: none")
        return self

    @field_validator("betas")
    @classmethod
    def _betas(cls, b: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= x < 1.0 for x in b):
            raise ValueError("each beta must lie in [0, 1)")
        return b

    @model_validator(mode="after")
    def _floor_needs_a_decay(self) -> OptimSection:
        if self.min_lr_ratio > 0 and self.schedule == "constant":
            raise ValueError(f"min_lr_ratio ({self.min_lr_ratio}) is the floor of the cosine decay; with schedule "
                             "constant the rate never decays: set schedule: cosine or drop it")
        return self


class TrainerSection(Section):
    total_steps: int | None = Field(None, ge=1)
    """Rollout steps to run; null = as many as `data_epochs` passes over the prompts give."""
    data_epochs: int = Field(1, ge=1)
    """Passes over the prompt set when total_steps is null (refused beside total_steps)."""
    prompts_per_step: int = Field(64, ge=1)
    """Global batch: prompts rolled out per step, across all ranks (Table 7: 64)."""
    prompts_per_minibatch: int = Field(64, ge=1)
    """Prompts per optimizer step (Table 7: 64 = one update per rollout, pure on-policy)."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each rollout batch (Table 7: 1)."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward on each rank (gradient accumulation fills the mini-batch).
    Not used beside `max_tokens_per_micro_batch` (a value other than the default is refused there)."""
    max_tokens_per_micro_batch: int | None = Field(None, ge=1)
    """Token budget per forward on each rank, instead of a fixed sequence count: a mini-batch's
    rows, sorted by length, are packed while rows x (longest prompt + longest response among them)
    stays within it (a longer row goes alone). The number of micro-batches then varies; ranks agree
    on the largest. None = `micro_batch_size` sequences per forward. The loss is unchanged.
    A starting value: `micro_batch_size` x (longest prompt + `rollout.max_new_tokens`), the memory
    of a fixed micro-batch of full-length rows; `micro_batch_size` is then not used. A budget
    below one full-length row (longest prompt + `rollout.max_new_tokens`) is warned about once at
    start: a longer row runs alone, over the budget (docs/troubleshooting.md)."""
    bucket_by_length: bool = False
    """Sort a mini-batch's rows by length before cutting `micro_batch_size`-row micro-batches, so
    each forward's padding is small (every micro-batch is trimmed to its own longest row anyway).
    Implied by `max_tokens_per_micro_batch` (and refused beside it). The loss is unchanged."""
    padding_free: bool = False
    """Pack each micro-batch's sequences end to end into one row, `position_ids` restarting at 0
    for each: no padding at all, and the token budget (`max_tokens_per_micro_batch`, required)
    then counts real tokens. Needs attention that honours packed `position_ids`: transformers'
    flash-attention kernels (variable-length, the fast case on GPU) or sdpa/eager with a
    block-diagonal mask (exact, but its cost grows with the square of the packed length). On CPU,
    measure before keeping it: 0.92x the padded step on a 25M-parameter model with a 1,024-token
    budget (docs/benchmarks.md), but 1.5-3x slower on the quickstart's tiny model with budgets of
    1,024-4,096, where attention over the packed row dominates. Checked on the model at start-up:
    a model whose attention ignores the packing is refused. The loss is unchanged."""
    max_staleness: int = Field(0, ge=0)
    """Bounded staleness k: with an engine that samples apart from the trainer (`rollout.engine:
    server`), up to k rollouts are in flight while the trainer trains, so step t+1's rollout is
    sampled while step t trains. A sample is trained on at most k policy versions after the one
    that produced it (logged as `async/staleness_mean`/`_max`); its sampler log-probs are the
    behaviour policy, which `algorithm.mismatch` corrects as usual. 0 = the on-policy algorithm of
    the paper (Table 7), bit-identical to the synchronous run (docs/async.md)."""
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

    @model_validator(mode="after")
    def _epochs_need_no_step_count(self) -> TrainerSection:
        if self.total_steps is not None and self.data_epochs != 1:
            raise ValueError(f"data_epochs ({self.data_epochs}) counts the steps only when total_steps is null; "
                             f"total_steps ({self.total_steps}) is set: drop one of them")
        return self

    @model_validator(mode="after")
    def _budget_replaces_row_counts(self) -> TrainerSection:
        if self.max_tokens_per_micro_batch is None:
            return self
        if self.bucket_by_length:
            raise ValueError("bucket_by_length is implied by max_tokens_per_micro_batch (a token budget sorts "
                             "rows by length anyway): drop it")
        if self.changed("micro_batch_size"):
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) is not used with max_tokens_per_micro_batch "
                             "(the token budget cuts the micro-batches): drop one of them")
        return self

    @model_validator(mode="after")
    def _padding_free_needs_a_budget(self) -> TrainerSection:
        if self.padding_free and self.max_tokens_per_micro_batch is None:
            raise ValueError("padding_free packs up to max_tokens_per_micro_batch tokens "
                             "per forward: set that budget too")
        return self
