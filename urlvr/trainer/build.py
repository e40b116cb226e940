"""Everything a run needs before step 1: model, tokenizer, prompts, engines, actor.

Kept apart from the loop so that `loop.py` reads as the algorithm only.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from urlvr.data.records import DataError, PromptRecord
from urlvr.data.stream import PromptStream
from urlvr.data.templates import EncodedPrompts, encode_prompts
from urlvr.models.lora import apply_lora
from urlvr.models.resolve import checked_model_path
from urlvr.recipe import Recipe
from urlvr.rollout.base import ROLLOUT_ENGINES, PromptInput, RolloutEngine, context_length
from urlvr.trainer.actor import Actor, AdapterOffReference, TokenScorer
from urlvr.trainer.batching import budget_warning, check_padding_free
from urlvr.trainer.producer import RolloutProducer
from urlvr.trainer.settings import RunSettings
from urlvr.dist import DistInfo
from urlvr.errors import RecipeError


@dataclass
class RunParts:
    tokenizer: Any
    actor: Actor
    reference: Any  # the initial policy when a KL is measured or penalised, else None: a frozen TokenScorer,
    # or under LoRA the actor itself with its adapters off (AdapterOffReference)
    engine: RolloutEngine
    records: dict[str, PromptRecord]
    prompts: dict[str, PromptInput]
    stream: PromptStream
    total_steps: int
    settings: RunSettings  # everything derived from the recipe once (sampling, batch shapes, statistics)
    eval_records: list[PromptRecord]  # this rank's shard of the evaluation prompts
    eval_prompts: list[PromptInput]
    held_out: dict[str, tuple[list[PromptRecord], list[PromptInput]]] = field(default_factory=dict)  # eval.held_out shards
    producer: RolloutProducer | None = None  # each step's rollout, now or ahead (trainer.max_staleness); built last
    advantage_state: dict = field(default_factory=dict)  # algorithm.advantage_shaping's per-prompt state (checkpointed)

    def generation_context(self) -> contextlib.AbstractContextManager:
        """Wrap every ``engine.generate``: an engine sampling from the trainer's own module needs
        the actor's gathered-parameters context under ZeRO-3; one with its own copy needs nothing."""
        return self.actor.generation_context() if self.engine.uses_trainer_module else contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_model_and_tokenizer(recipe: Recipe):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy (seconds), loaded on demand: a model is loaded

    path = checked_model_path(recipe.model.path)
    kwargs: dict[str, Any] = {"trust_remote_code": recipe.model.trust_remote_code, "dtype": torch.float32}
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=recipe.model.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:  # not a folder, not on the hub (or no network), no weights or tokenizer in it
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RecipeError(f"model.path {recipe.model.path!r}: cannot load it: {reason}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def encode_recipe_prompts(recipe: Recipe, tokenizer, records: Sequence[PromptRecord],
                          context: int | None) -> EncodedPrompts:
    """`records` encoded by the recipe's template, system prompt, suffix and long-prompt policy
    (training, evaluation and `urlvr probe` alike); `context`: the model's context length."""
    data = recipe.data
    return encode_prompts(tokenizer, records, template=data.template, system_prompt=data.system_prompt,
                          suffix=data.prompt_suffix, max_prompt_length=data.max_prompt_length,
                          on_long_prompt=data.on_long_prompt, context_length=context)


def warn_about_budget(recipe: Recipe, prompts: Sequence[PromptInput]) -> None:
    """Print `budget_warning`'s start-up warning, if any, for the longest of `prompts`."""
    longest_prompt = max((len(p.token_ids) for p in prompts), default=0)
    warning = budget_warning(recipe.trainer.max_tokens_per_micro_batch, longest_prompt, recipe.rollout.max_new_tokens)
    if warning:
        print(warning, file=sys.stderr, flush=True)


def build_run(recipe: Recipe, dist: DistInfo) -> RunParts:
    settings = RunSettings.derive(recipe, dist)  # a batch that does not fit the world size fails first
    seed_everything(settings.seed)
    model, tokenizer = load_model_and_tokenizer(recipe)
    vocab = model.get_input_embeddings().num_embeddings
    outside = [t for t in recipe.rollout.stop_token_ids if not 0 <= t < vocab]
    if outside:  # never sampled: the stop would silently never fire
        raise RecipeError(f"rollout.stop_token_ids: {outside} outside the model's vocabulary (ids 0..{vocab - 1})")
    if recipe.model.lora is not None:  # base frozen, adapters trained; the reference is the base itself
        model = apply_lora(model, recipe.model.lora)
    records = recipe.data.source.load()
    # encode every prompt now: an over-long prompt fails before step 1, not at step 300
    encoded = encode_recipe_prompts(recipe, tokenizer, records, context_length(model))
    by_id = {p.prompt_id: p for p in encoded.inputs}
    if dist.is_main:
        warn_about_budget(recipe, encoded.inputs)
    records = list(encoded.records)
    trainer = recipe.trainer
    stream = PromptStream(
        records, prompts_per_step=trainer.prompts_per_step, seed=settings.seed, shuffle=recipe.data.shuffle,
        epochs=None if trainer.total_steps else trainer.data_epochs, rank=dist.rank, world_size=dist.world_size,
    )
    total_steps = trainer.total_steps or stream.steps_available()
    shaping = recipe.algorithm.advantage_shaping
    if getattr(shaping, "needs_revisits", False) and total_steps * trainer.prompts_per_step <= len(records):
        raise RecipeError(f"algorithm.advantage_shaping: {shaping.name} reads each prompt's earlier visits, and this run "
                          f"visits none twice ({total_steps} steps x {trainer.prompts_per_step} prompts over "
                          f"{len(records)} prompts): it would do nothing; use test-time training or more steps")
    reference = None
    if settings.needs_reference and recipe.model.lora is None:
        on_host = recipe.algorithm.kl_coef == 0 and recipe.dynamics.kl_reference_device == "cpu"
        reference = _frozen_reference(recipe, torch.device("cpu") if on_host else dist.device)
    actor = Actor(
        model, recipe, world_size=dist.world_size, micro_steps_per_minibatch=settings.micro_steps_per_minibatch,
        total_optimizer_steps=total_steps * settings.optimizer_steps_per_rollout,
    )
    if trainer.padding_free:  # before step 1: a model whose attention ignores packing fails here, not silently
        check_padding_free(lambda micro: actor.score(micro.to(dist.device), ("logprob",), temperature=settings.temperature),
                           tolerance=1e-3 if recipe.optim.deepspeed.precision == "fp32" else 5e-2)
    if settings.needs_reference and recipe.model.lora is not None:
        reference = AdapterOffReference(actor)  # no second copy: dynamics.kl_reference_device does not apply
    engine = ROLLOUT_ENGINES.get(recipe.rollout.engine.name).from_recipe(recipe, actor.model, tokenizer, dist)
    context = context_length(actor.model)
    eval_records, eval_prompts = _evaluation_shard(recipe.eval.source, recipe, tokenizer, dist, context)
    held_out = {name: _evaluation_shard(source, recipe, tokenizer, dist, context, f"eval.held_out.{name}")
                for name, source in recipe.eval.held_out.items()}
    if dist.is_main:
        note = capped_responses_note(encoded.inputs, recipe.rollout.max_new_tokens, context)
        if note:
            print(f"urlvr: note: {note}")
        if trainer.max_staleness and recipe.algorithm.mismatch.name == "none":
            print(f"urlvr: note: trainer.max_staleness {trainer.max_staleness}: samples up to {trainer.max_staleness} "
                  "policy versions old train with no importance correction (algorithm.mismatch: none; the PPO ratio "
                  "is taken against the current policy); algorithm.mismatch: token_tis weights each token by "
                  "pi_current / pi_sampler (docs/async.md)")
    if recipe.mode == "test_time" and len(records) > 128 and dist.is_main:
        print(f"urlvr: warning: test-time training on {len(records)} prompts; the paper finds it safe up to ~128 (§5.2)",
              flush=True)
    parts = RunParts(
        tokenizer=tokenizer, actor=actor, reference=reference, engine=engine,
        records={r.prompt_id: r for r in records}, prompts=by_id, stream=stream,
        total_steps=total_steps, settings=settings,
        eval_records=eval_records, eval_prompts=eval_prompts, held_out=held_out,
    )
    parts.producer = RolloutProducer(engine, stream, by_id, settings, parts.generation_context, total_steps, dist)
    return parts


def capped_responses_note(prompts, max_new_tokens: int, context: int | None) -> str | None:
    """A line saying that some responses will be cut at the model's context before
    `max_new_tokens`, or None when every prompt leaves room for a full response."""
    if context is None:
        return None
    short = [p for p in prompts if len(p.token_ids) + max_new_tokens > context]
    if not short:
        return None
    return (f"{len(short)} of {len(prompts)} prompts leave fewer than rollout.max_new_tokens={max_new_tokens} tokens "
            f"before the model's context length ({context}, config.max_position_embeddings); their responses are "
            "cut there, with finish reason `length` (counted in response/truncation_rate), by either engine")


def _evaluation_shard(source, recipe: Recipe, tokenizer, dist: DistInfo, context: int | None,
                      where: str = "eval.source") -> tuple[list[PromptRecord], list[PromptInput]]:
    if source is None:
        return [], []
    records = source.load()
    unlabelled = [r.prompt_id for r in records if r.label is None]
    if unlabelled:
        raise DataError(f"{where}: {len(unlabelled)} prompts have no label (first: {unlabelled[0]!r}); "
                        "evaluation needs labels")
    encoded = encode_recipe_prompts(recipe, tokenizer, records, context)
    shard = slice(dist.rank, None, dist.world_size)
    return list(encoded.records[shard]), list(encoded.inputs[shard])


def _frozen_reference(recipe: Recipe, device: torch.device):
    model, _ = load_model_and_tokenizer(recipe)
    model.requires_grad_(False)
    return TokenScorer(model).to(device).eval()

