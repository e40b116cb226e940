"""The policy and its sampling: `model` and `rollout` (the engine's own section lives in its module)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, model_validator

from urlvr.recipe.sections.base import Section, VariantSection
from urlvr.recipe.variants import VariantOf


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


class RolloutSection(Section):
    engine: Annotated[VariantSection, VariantOf("rollout_engine", default="transformers")] = "transformers"
    """Rollout engine: a registered name, or a mapping `{name: ..., <its own knobs>}` (each engine's
    section is listed below: `transformers` samples with the trainer's own module, `vllm` with a
    colocated vLLM engine, docs/vllm.md; docs/writing-engines.md adds one)."""
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
    dynamic_sampling: Annotated[VariantSection, VariantOf("group_filter", default="none")] = "none"
    """DAPO's dynamic sampling with refill: groups the filter drops (`zero_variance`: all rewards
    equal; `agreement`: also p_maj above a threshold) are replaced by groups of further prompts,
    one more global batch per round, until the step has `prompts_per_step` informative groups or
    `max_rounds` is reached (then filtered groups fill it). Needs `trainer.total_steps`.
    Logs `dynamic_sampling/{filtered_fraction,rounds,prompts_consumed,filled_groups}`; `none` = off."""

    @model_validator(mode="before")
    @classmethod
    def _moved_engine_knobs(cls, data: Any) -> Any:
        found = [key for key in _MOVED_ENGINE_KNOBS if isinstance(data, dict) and key in data]
        if found:
            raise ValueError("; ".join(f"{key} moved into the engine's own section: write {_MOVED_ENGINE_KNOBS[key]}"
                                       for key in found))
        return data


_MOVED_ENGINE_KNOBS = {  # a key RolloutSection no longer has -> where it lives now
    "generation_batch_size": "`engine: {name: transformers, generation_batch_size: ...}` "
                             "(--set rollout.engine.generation_batch_size=...)",
    "vllm": "`engine: {name: vllm, <the keys of rollout.vllm>}` (--set rollout.engine.sync_bucket_mb=...)",
}
