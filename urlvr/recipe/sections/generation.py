"""The policy and its sampling: `model` and `rollout` (with the vLLM engine's settings)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from urlvr.recipe.names import check_registered
from urlvr.recipe.sections.base import Section


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
