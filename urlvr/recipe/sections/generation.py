"""The policy and its sampling: `model` and `rollout` (the engine's own section lives in its module)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from urlvr.section import Section, VariantSection
from urlvr.recipe.variants import VariantOf


class LoraSection(Section):
    """`model.lora`: train low-rank adapters through `peft` instead of every weight (docs/lora.md)."""

    rank: int = Field(16, ge=1)
    """LoRA rank r of each adapter (`peft.LoraConfig.r`)."""
    alpha: float = Field(32.0, gt=0.0)
    """LoRA alpha; the adapter's update is scaled by alpha / rank."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input, applied in the training forward only (the scoring pass runs
    without it, so with dropout > 0 the on-policy ratio is no longer exactly 1)."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Modules that get adapters: `all-linear` (every linear layer of the decoder, never the LM
    head) or a list of module-name suffixes (`[q_proj, v_proj]`). The LM head and the token
    embeddings cannot be targeted (tied with each other in many models)."""
    export_merged: bool = False
    """Also write the merged model (base + adapters, loadable with `AutoModelForCausalLM`) to
    `<export>/merged/` beside the adapter (needs an export: `trainer.export_final_model`, or
    `collapse.action: stop`, which exports the best checkpoint)."""

    @field_validator("target_modules")
    @classmethod
    def _no_embeddings(cls, value: list[str] | str) -> list[str] | str:
        refused = [name for name in value if name in _EMBEDDING_NAMES] if isinstance(value, list) else []
        if refused:
            raise ValueError(f"LoRA on {refused} is not supported: the LM head and the token embeddings are tied in "
                             "many models and the trainer scores with the head's plain weight; adapt the decoder's "
                             "linear layers (`all-linear`)")
        if isinstance(value, list) and not value:
            raise ValueError("name at least one module, or write `all-linear`")
        return value


# refused by name here; whatever name reaches a model's embeddings is refused when the adapters are built
_EMBEDDING_NAMES = {"lm_head", "embed_tokens"}


class ModelSection(Section):
    path: str = "urlvr/tiny"
    """Local directory or hub id of a causal LM. `urlvr/tiny` is the embedded tiny model that
    urlvr ships (no download)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder block's activations in the backward pass of the training forward,
    keeping only the block's input (one hidden state per token: about 30x less activation memory,
    docs/troubleshooting.md), at the cost of one more forward of every block per micro-batch. The
    update is unchanged; the scoring pass and generation are not affected. A model without
    transformers' `GradientCheckpointingLayer` blocks is refused at start-up."""
    attn_implementation: str | None = None
    """transformers attention backend (`sdpa`, `eager`, `flash_attention_2`); None = default."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint (needed by some hub models)."""
    lora: LoraSection | None = None
    """Train LoRA adapters instead of the whole model (`{rank: 16, alpha: 32}`); null = full
    fine-tuning. The KL reference is then the same model with its adapters off (docs/lora.md)."""


class RolloutSection(Section):
    engine: Annotated[VariantSection, VariantOf("rollout_engine", default="transformers")] = "transformers"
    """Rollout engine: a registered name, or a mapping `{name: ..., <its own knobs>}` (each engine's
    section is listed below: `transformers` samples with the trainer's own module, `vllm` with a
    colocated vLLM engine, docs/vllm.md; `server` with either in a process and on devices of its
    own, overlapping with training under `trainer.max_staleness`, docs/async.md;
    docs/writing-engines.md adds one)."""
    group_size: int = Field(8, ge=1, le=1024)
    """Samples per prompt, N (Table 7: 8). At least 2: every advantage is relative to the group,
    so a group of one sample gets advantage 0 and trains nothing (and no vote has a rival)."""

    @field_validator("group_size")
    @classmethod
    def _a_group_has_rivals(cls, size: int) -> int:
        if size < 2:
            raise ValueError("a group of 1 sample gets advantage 0 (advantages are relative to the group) "
                             "and trains nothing: use 2 or more")
        return size

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
    dynamic_sampling: Annotated[VariantSection, VariantOf("group_filter", default="none")] = "none"
    """DAPO's dynamic sampling with refill: groups the filter drops (`zero_variance`: all rewards
    equal to within 1e-5 of the group's largest |r|; `agreement`: also p_maj above a threshold)
    are replaced by groups of further prompts, one more global batch of `prompts_per_round` per
    round, until the step has `prompts_per_step` informative groups or `max_rounds` is reached
    (then filtered groups fill it); surplus groups are dropped. Needs `trainer.total_steps`.
    Logs `dynamic_sampling/{filtered_fraction,rounds,prompts_consumed,filled_groups}` and, over
    every generated group, `dynamic_sampling/generated_{proxy_mean,ground_truth_mean,majority_ratio}`
    (`reward/*` then describe the trained groups only); `none` = off."""

    @model_validator(mode="before")
    @classmethod
    def _moved_engine_knobs(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if "vllm" in data:  # the old vLLM section: its knobs now sit beside the engine's name
            knobs = "".join(f", {k}: {v}" for k, v in (data["vllm"] or {}).items()) if isinstance(data["vllm"], dict) else ""
            raise ValueError(f"vllm moved into the engine's own section: write `engine: {{name: vllm{knobs}}}` "
                             f"(--set 'rollout.engine={{name: vllm{knobs}}}')")
        if "generation_batch_size" in data:
            size = data["generation_batch_size"]
            raise ValueError(f"generation_batch_size moved into the engine's own section: write `engine: {{name: "
                             f"transformers, generation_batch_size: {size}}}` (--set rollout.engine.generation_batch_size={size})")
        return data

