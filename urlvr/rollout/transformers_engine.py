"""Rollouts with plain transformers: our own KV-cache sampling loop over the trainer's module.

Why not ``model.generate``: GRPO needs more than tokens from its sampler. It needs the
sampler's log-prob of every sampled token under the distribution it was actually drawn from
(temperature, then top-k/top-p renormalised: the behaviour policy, as vLLM's
``processed_logprobs``; see ``Sample``), exact control of stop tokens and of the RNG, and
the same position ids as the trainer's scoring pass (``position_ids_from_attention_mask``) so
that, with the filters off and on-policy, the two agree to float noise. A 60-line loop gives
all of that and hides nothing.

The loop, per chunk of ``generation_batch_size`` sequences:
  1. prefill each distinct prompt once (left-padded), then copy its KV cache to its samples;
  2. sample one token per live row, record it and its log-prob;
  3. drop rows that produced eos or a stop token, or filled their budget, from the batch (and
     the cache);
  4. feed the new tokens with the cache; stop when no row is live.
A row's budget is ``max_new_tokens``, capped where prompt + response would pass the model's
context length (``rollout.base.response_budget``): as vLLM caps at ``max_model_len``, with
finish reason ``length`` either way.

ZeRO-3 note: every forward of a ZeRO-3 module all-gathers parameters, so ranks that stop at
different steps would hang each other. Under ZeRO-3 call ``generate`` inside the actor's
gathered-parameters context (as TRL's ``unwrap_model_for_generation`` does); ZeRO-1/2 need
nothing.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import torch
from pydantic import Field

from urlvr.section import VariantSection
from urlvr.rollout.base import (
    ROLLOUT_ENGINES,
    Group,
    PromptInput,
    Sample,
    SamplingParams,
    check_generate_request,
    context_length,
    eos_token_ids,
    finish_reason,
    hashed_seed,
    response_budget,
)
from urlvr.rollout.collate import position_ids_from_attention_mask

_CONTEXT = "the model's context length (config.max_position_embeddings)"


class TransformersEngineSection(VariantSection):
    """`rollout.engine: transformers`: urlvr's own sampling loop over the trainer's module."""

    name: Literal["transformers"] = "transformers"
    generation_batch_size: int = Field(64, ge=1)
    """Sequences generated together (a memory knob: it sets the batch of the KV cache)."""


@ROLLOUT_ENGINES.register("transformers")
class TransformersRolloutEngine:
    """Samples grouped responses from a causal LM with HF forward semantics.

    The engine holds a reference to the very module the trainer optimizes (for DeepSpeed, the
    engine's ``.module``), not a copy: optimizer steps update its parameters in place, so the
    next ``generate`` already samples from the new policy and ``sync_weights`` has nothing to
    copy. Passing a different module to ``sync_weights`` swaps the reference.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, generation_batch_size: int = 64) -> None:
        if generation_batch_size < 1:
            raise ValueError(f"generation_batch_size must be >= 1, got {generation_batch_size}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; the engine needs one to end responses")
        self.model = model
        self.tokenizer = tokenizer
        self.generation_batch_size = generation_batch_size
        self.pad_token_id: int = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )

    settings = TransformersEngineSection
    uses_trainer_module = True

    @classmethod
    def from_recipe(cls, recipe, model: torch.nn.Module, tokenizer, dist) -> TransformersRolloutEngine:
        settings: TransformersEngineSection = recipe.rollout.engine
        return cls(model, tokenizer, generation_batch_size=settings.generation_batch_size)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """No copy: the engine samples from the trainer's own module (see the class docstring)."""
        if model is not self.model:
            self.model = model

    def offload(self) -> None:
        """Nothing to free: the engine owns no weights or cache between calls."""

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end a response with reason "eos" (see ``rollout.base.eos_token_ids``)."""
        config = getattr(self.model, "generation_config", None)
        return eos_token_ids(self.tokenizer, getattr(config, "eos_token_id", None))

    def generate(
        self, prompts: Sequence[PromptInput], group_size: int, sampling: SamplingParams
    ) -> list[Group]:
        """One ``Group`` per prompt, in prompt order, each with ``group_size`` samples.

        With ``sampling.seed`` set, a private generator makes the call reproducible on its own;
        with ``seed=None`` the global torch RNG (CUDA's on GPU) is used, so a trainer that saves
        and restores RNG state reproduces its rollouts. With ``sampling.prompt_seeds`` every
        sample has its own generator, so its draws do not depend on how rows are batched.
        """
        check_generate_request(prompts, group_size, sampling)
        if not prompts:
            return []
        limit = context_length(self.model)
        budgets = [response_budget(p, sampling.max_new_tokens, limit, _CONTEXT) for p in prompts]

        device = next(self.model.parameters()).device
        # Sequence i is sample i % group_size of prompt i // group_size; chunks cut anywhere.
        row_prompt = [p for p in range(len(prompts)) for _ in range(group_size)]
        generators: torch.Generator | list[torch.Generator] | None = None
        if sampling.prompt_seeds is not None:
            generators = [
                torch.Generator(device=device).manual_seed(sample_seed(sampling.prompt_seeds[i // group_size], i % group_size))
                for i in range(len(row_prompt))
            ]
        elif sampling.seed is not None:
            generators = torch.Generator(device=device).manual_seed(sampling.seed)

        samples: list[Sample] = []
        with _generation_mode(self.model):
            for start in range(0, len(row_prompt), self.generation_batch_size):
                chunk = row_prompt[start : start + self.generation_batch_size]
                chunk_generators = generators[start : start + len(chunk)] if isinstance(generators, list) else generators
                samples.extend(self._generate_chunk(prompts, chunk, [budgets[p] for p in chunk], sampling,
                                                    chunk_generators, device))
        return [
            Group(prompt=prompt, samples=tuple(samples[p * group_size : (p + 1) * group_size]))
            for p, prompt in enumerate(prompts)
        ]

    def _generate_chunk(
        self,
        prompts: Sequence[PromptInput],
        row_prompt: list[int],
        row_budget: list[int],
        sampling: SamplingParams,
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device,
    ) -> list[Sample]:
        """Sample one response per entry of ``row_prompt`` (indices into ``prompts``), each of at most
        its ``row_budget`` tokens (``response_budget``); ``generator`` is shared by the rows or, as a
        list, one per row."""
        distinct = sorted(set(row_prompt))
        input_ids, attention_mask = _left_pad([prompts[p].token_ids for p in distinct], self.pad_token_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)  # [U, P]
        end_ids = torch.tensor(sorted(self.eos_token_ids | set(sampling.stop_token_ids)), dtype=torch.long,
                               device=device)

        # 1. Prefill each distinct prompt once; its samples then share copies of its cache.
        extra = {"logits_to_keep": 1} if _accepts(self.model, "logits_to_keep") else {}
        cache_kwarg = "cache" if _accepts(self.model, "cache") else "past_key_values"  # transformers >= 5.24: `cache`
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_attention_mask(attention_mask),
            use_cache=True,
            **extra,
        )
        cache = _checked_cache(out)
        slot = {p: i for i, p in enumerate(distinct)}
        expand = torch.tensor([slot[p] for p in row_prompt], device=device)  # [R]
        cache.batch_select_indices(expand)
        logits = out.logits[expand, -1]  # [R, V]
        attention_mask = attention_mask[expand]  # [R, P]

        budgets = torch.tensor(row_budget, dtype=torch.long, device=device)  # [R]
        rows, steps = len(row_prompt), max(row_budget)
        tokens = torch.full((rows, steps), self.pad_token_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((rows, steps), dtype=torch.float32, device=device)
        lengths = budgets.clone()  # a row that never ends early fills its budget
        live = torch.arange(rows, device=device)  # chunk row of each batch row still generating

        for step in range(steps):
            # 2. Sample and record.
            live_generator = [generator[i] for i in live.tolist()] if isinstance(generator, list) else generator
            next_tokens, next_logprobs = sample_next_tokens(logits, sampling, live_generator)  # [A], [A]
            tokens[live, step] = next_tokens
            logprobs[live, step] = next_logprobs
            finished = torch.isin(next_tokens, end_ids) | (budgets[live] == step + 1)  # [A]
            if step == steps - 1:
                break
            # 3. Retire finished rows: they stop growing and leave the batch and the cache.
            if finished.any():
                lengths[live[finished]] = step + 1
                keep = (~finished).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                live, next_tokens, attention_mask = live[keep], next_tokens[keep], attention_mask[keep]
                cache.batch_select_indices(keep)
            # 4. One decode step for the live rows.
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(live), 1))], dim=1)
            out = self.model(
                input_ids=next_tokens[:, None],
                attention_mask=attention_mask,
                position_ids=position_ids_from_attention_mask(attention_mask)[:, -1:],
                use_cache=True,
                **{cache_kwarg: cache},
            )
            cache = _checked_cache(out)
            logits = out.logits[:, -1]

        # Rows still live at the last step were not retired inside the loop: their length is
        # already their budget, which is `steps`.
        lengths_list = lengths.tolist()
        token_lists = [row[:n] for row, n in zip(tokens.tolist(), lengths_list)]
        logprob_lists = [row[:n] for row, n in zip(logprobs.tolist(), lengths_list)]
        texts = self.tokenizer.batch_decode(token_lists, skip_special_tokens=True)
        return [
            Sample(token_ids=tuple(ids), logprobs=tuple(lps), text=text,
                   finish_reason=finish_reason(ids[-1], capped=len(ids) == cap, eos_ids=self.eos_token_ids,
                                               stop_ids=sampling.stop_token_ids))
            for ids, lps, text, cap in zip(token_lists, logprob_lists, texts, row_budget)
        ]


def sample_next_tokens(
    logits: torch.Tensor, sampling: SamplingParams,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """token ~ softmax(filter(logits / T)); logprob = log_softmax(filter(logits / T))[token].

    ``logits``: [A, V]. Returns ``(tokens [A] int64, logprobs [A] float32)``. The log-prob is
    that of the distribution the token was drawn from, top-k/top-p renormalised (vLLM's
    ``processed_logprobs``; the behaviour policy for importance sampling). Greedy takes the
    argmax and reports log-probs at temperature 1 without filters, as vLLM does.
    ``generator`` is one generator for all rows or a sequence of A, one per row.
    """
    sampled_logits = sampling_logits(logits, sampling)  # [A, V]
    logprobs_all = torch.log_softmax(sampled_logits, dim=-1)
    if sampling.greedy:
        tokens = logprobs_all.argmax(dim=-1)
    else:
        probs = torch.softmax(sampled_logits, dim=-1)
        if isinstance(generator, Sequence):
            tokens = inverse_cdf_draw(probs, generator)
        else:
            tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(1)


def inverse_cdf_draw(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """token_a = min{v : F_a(v) > u_a * F_a(V-1)}, F_a the cumulative sum of row a, u_a ~ U[0, 1).

    ``probs``: [A, V], each row non-negative with a positive sum (need not be normalised).
    ``generators``: A generators; row a draws its one uniform from ``generators[a]``, so a row's
    token depends only on its own RNG, whatever the batch (the per-row reproducibility the
    trainer's prompt seeds promise). Returns [A] int64.

    Why inverse-CDF: one uniform per row is O(1) RNG work per row instead of O(V) -- the
    exponential race it replaced filled V = 49k-262k noise floats per row per token, 7.3-8.0% of a
    SmolLM2 rollout (docs/benchmarks.md). The cumulative sum is float64 so that a 262k
    vocabulary's tail keeps its mass; a token of probability 0 owns an empty interval
    [F(v-1), F(v)) and is never drawn.
    """
    cdf = probs.double().cumsum(dim=-1)  # [A, V]
    uniforms = torch.stack([torch.rand((), dtype=torch.float64, device=probs.device, generator=g) for g in generators])
    targets = (uniforms * cdf[:, -1]).unsqueeze(1)  # [A, 1], strictly below each row's total
    return torch.searchsorted(cdf, targets, right=True).squeeze(1).clamp_max(probs.shape[-1] - 1)


def sampling_logits(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """The logits of the distribution a token is drawn from: filter(logits / T) in float32, or
    the logits themselves for greedy. Their log_softmax is the sampler log-prob (``Sample``). [A, V]."""
    if sampling.greedy:
        return logits.float()
    return filter_top_k_top_p(logits.float() / sampling.temperature, sampling.top_k, sampling.top_p)


def sample_seed(prompt_seed: int, sample_index: int) -> int:
    """The seed of one sample's generator (63 bits: manual_seed takes values below 2**63)."""
    return hashed_seed(prompt_seed, sample_index)


def filter_top_k_top_p(scaled_logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top ``top_k`` and outside the nucleus of mass ``top_p``.

    The nucleus keeps a token when the mass of the tokens ranked above it is below ``top_p``,
    so the most likely token always survives (``top_p`` -> 0 is greedy). ``top_k = 0`` and
    ``top_p >= 1`` switch the filters off. [A, V] -> [A, V].
    """
    logits = scaled_logits
    if 0 < top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [A, 1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [A, V]
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_above >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _left_pad(sequences: Iterable[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids [N, L], attention_mask [N, L]), padded on the left."""
    sequences = [list(s) for s in sequences]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, width - len(seq) :] = 1
    return input_ids, attention_mask


def _checked_cache(out):
    # `cache` first: reading the old `past_key_values` name warns in transformers >= 5.24
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        raise TypeError(
            "the model returned no transformers Cache (past_key_values) with use_cache=True; "
            f"the transformers rollout engine needs one (got {type(cache).__name__})"
        )
    return cache


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    """Whether forward() takes ``argument`` (`logits_to_keep`: logits for the last position only,
    which saves a [U, P, V] tensor; `cache`: the current name of `past_key_values`)."""
    return argument in inspect.signature(model.forward).parameters


@contextlib.contextmanager
def _generation_mode(model: torch.nn.Module) -> Iterator[None]:
    """No grad, eval mode (no dropout; gradient checkpointing, which only acts in training mode,
    then leaves the cache alone) and ``config.use_cache`` on; every module's own mode restored."""
    modes = [(module, module.training) for module in model.modules()]
    config = getattr(model, "config", None)
    had_use_cache = hasattr(config, "use_cache")
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if had_use_cache:
        config.use_cache = True
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        if had_use_cache:
            config.use_cache = use_cache
