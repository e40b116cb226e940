"""The actor: an HF causal LM trained under DeepSpeed, with one chunked scoring forward.

`TokenScorer` wraps the HF model so that a forward returns per-token statistics of the
response only: it runs the decoder, then applies the LM head chunk by chunk over response
positions, so no `[T, V]` float32 logits tensor for a whole sequence is ever held at once
(the decoder's hidden states are `[T, H]`, far smaller). The same module serves the no-grad
scoring pass (old log-probs and the statistics the run declared) and the training forward,
so on-policy importance ratios are exactly 1.
Logits are `lm_head(hidden)`, soft-capped as the model's own forward does where its config sets
`final_logit_softcapping` (Gemma 2); a model that rescales its logits otherwise (`logit_scale`,
`logits_scaling`) is refused rather than scored wrongly.

LoRA (`model.lora`): the model is a `peft` PeftModel whose adapters are injected into the HF
model's own layers, so the scorer runs the wrapped HF model's decoder and head (`causal_lm`) and
the adapters apply; only adapter parameters reach the optimizer. The initial policy is the same
module with its adapters switched off (`AdapterOffReference`), not a second copy of the weights.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from urlvr.errors import RecipeError
from urlvr.models.lora import causal_lm, is_peft_model
from urlvr.recipe import Recipe
from urlvr.algorithms.token_stats import compute_token_stats
from urlvr.rollout.weight_sync import gathered, iter_weights
from urlvr.trainer.activation_checkpointing import checkpoint_decoder_blocks
from urlvr.trainer.lm_head import chunked_logprob, recomputes_in_backward
from urlvr.trainer.batching import MicroBatch
from urlvr.trainer.optimizer import optimizer_param_groups


def logit_softcap(config) -> float | None:
    """The config's `final_logit_softcapping` (None: plain logits). Raises RecipeError for a model
    whose forward rescales its logits in a way the scorer does not reproduce, naming the field."""
    for field in ("logit_scale", "logits_scaling"):  # Cohere multiplies, Granite divides
        value = getattr(config, field, None)
        if value not in (None, 1, 1.0):
            raise RecipeError(f"model.path: the model's config sets {field}={value}: its forward rescales the logits, which "
                             "urlvr's scorer does not reproduce; its log-probs would be wrong")
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


class TokenScorer(nn.Module):
    """forward(...) -> {stat: [b, T]} for response positions, computed chunk-wise."""

    def __init__(self, model: nn.Module, chunk_size: int = 512) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.softcap = logit_softcap(causal_lm(model).config)

    def forward(
        self,
        input_ids: torch.Tensor,  # [b, P+T]
        attention_mask: torch.Tensor,  # [b, P+T]
        position_ids: torch.Tensor,  # [b, P+T]
        prompt_length: int,
        temperature: float,
        stats: tuple[str, ...],
        raw_stats: tuple[str, ...] = (),
        detached_stats: tuple[str, ...] = (),
        response_mask: torch.Tensor | None = None,  # [b, T]
        predict_index: torch.Tensor | None = None,  # [N]
    ) -> dict[str, torch.Tensor]:
        """`stats` on temperature-scaled logits; `raw_stats` also on the unscaled ones, returned as
        `raw_<name>` (certainty rewards measured on the model's own distribution); `detached_stats`
        on the scaled logits without gradients (logged only: no autograd graph kept) -- same pass.

        With `response_mask`, only its positions reach the LM head and the statistics (the `[N, V]`
        logits of the N real tokens, never those of padding: with a 32k+ vocabulary the head is
        about half a small model's compute). Every value is then 0 at the mask's zeros (an all-zero
        mask scores position [0, 0] alone, so that a loss over it still reaches the graph).

        Packed inputs (`trainer.padding_free`: `input_ids` `[1, L]`, `attention_mask` None) give
        `predict_index`, the position predicting each of `response_mask`'s real tokens in its
        row-major order; the output is still `[b, T]`."""
        lm = causal_lm(self.model)  # a PeftModel's `base_model` is its LoraModel, not the decoder
        hidden = lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # [b, P+T, H]
        if predict_index is not None:  # packed: one row, the real tokens only
            keep = response_mask.bool()  # [b, T]
            hidden, flat_targets = hidden[0, predict_index], input_ids[0, predict_index + 1]  # [N, H], [N]
        else:
            targets = input_ids[:, prompt_length:]  # [b, T]
            hidden = hidden[:, prompt_length - 1 : -1]  # position P-1+t predicts response token t
            keep = torch.ones_like(targets, dtype=torch.bool) if response_mask is None else response_mask.bool()
            if not keep.any():  # nothing real: score one position so the loss still reaches the graph
                keep = keep.clone()
                keep[0, 0] = True
            hidden, flat_targets = hidden[keep], targets[keep]  # [N, H], [N]
        lm_head = lm.get_output_embeddings()

        def in_place(flat: torch.Tensor) -> torch.Tensor:  # [N] -> [b, T], 0 where keep is False
            return torch.zeros(keep.shape, dtype=flat.dtype, device=flat.device).masked_scatter(keep, flat)

        if self.softcap is None and recomputes_in_backward(lm_head, stats, raw_stats):  # training: no [N, V] logits kept
            values = chunked_logprob(hidden, lm_head, flat_targets, temperature, self.chunk_size, detached_stats)
            return {name: in_place(value) for name, value in values.items()}
        values = self._head_in_chunks(hidden, lm_head, flat_targets, temperature, stats, raw_stats, detached_stats,
                                      step=self.chunk_size * keep.shape[0])  # `chunk_size` positions of every row
        return {name: in_place(value) for name, value in values.items()}

    def _head_in_chunks(self, hidden: torch.Tensor, lm_head: nn.Module, flat_targets: torch.Tensor,
                        temperature: float, stats: tuple[str, ...], raw_stats: tuple[str, ...],
                        detached_stats: tuple[str, ...], *, step: int) -> dict[str, torch.Tensor]:
        """The statistics `[N]` of the real tokens' hidden states `[N, H]`, `step` positions' logits
        `[step, V]` at a time (the memory of `chunk_size` positions of every row)."""
        names = stats + tuple(f"raw_{n}" for n in raw_stats) + detached_stats
        chunks: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for start in range(0, flat_targets.shape[0], step):
            end = start + step
            raw = lm_head(hidden[start:end]).float()  # [n, V]
            if self.softcap is not None:  # as Gemma 2's forward: cap * tanh(logits / cap)
                raw = torch.tanh(raw / self.softcap) * self.softcap
            scaled = raw / temperature  # [n, V], once: the trained and the logged statistics share it
            lse = torch.logsumexp(scaled, dim=-1)
            for name, value in compute_token_stats(scaled, flat_targets[start:end], stats, lse).items():
                chunks[name].append(value)
            if detached_stats:
                with torch.no_grad():
                    for name, value in compute_token_stats(scaled.detach(), flat_targets[start:end],
                                                           detached_stats, lse.detach()).items():
                        chunks[name].append(value)
            if raw_stats:
                for name, value in compute_token_stats(raw, flat_targets[start:end], raw_stats).items():
                    chunks[f"raw_{name}"].append(value)
        return {name: torch.cat(parts) for name, parts in chunks.items()}


def lr_lambda(recipe: Recipe, total_optimizer_steps: int):
    """Linear warm-up, then constant or cosine decay to min_lr_ratio."""
    optim = recipe.optim

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        span = max(1, total_optimizer_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(recipe: Recipe, micro_batch_size: int, accumulation_steps: int, world_size: int) -> dict:
    ds = recipe.optim.deepspeed
    config: dict = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps,
        "train_batch_size": micro_batch_size * accumulation_steps * world_size,
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if recipe.optim.grad_clip is not None:
        config["gradient_clipping"] = recipe.optim.grad_clip
    if ds.offload_optimizer and ds.zero_stage > 0:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if ds.zero_stage == 3:
        # gather whole parameters only when needed; keep small models unsharded-at-rest simple
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return _merge(config, ds.config_overrides)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class Actor:
    """DeepSpeed engine around `TokenScorer(model)`: scoring, one training micro-step, export."""

    def __init__(self, model: nn.Module, recipe: Recipe, *, world_size: int, micro_steps_per_minibatch: int,
                 total_optimizer_steps: int) -> None:
        import deepspeed  # heavy (about a second), loaded on demand: an actor is built

        self.zero_stage = recipe.optim.deepspeed.zero_stage
        if recipe.model.gradient_checkpointing:  # not transformers' switch: it needs train mode (see the module)
            checkpoint_decoder_blocks(model)
        model.config.use_cache = False
        self.scorer = TokenScorer(model)
        # LoRA dropout acts in the training forward only (the scoring pass stays deterministic)
        self.adapter_dropouts = [m for name, m in model.named_modules()
                                 if ".lora_dropout." in f"{name}." and isinstance(m, nn.Dropout)]
        optimizer = torch.optim.AdamW(  # each group carries its weight decay (optim.weight_decay_exclude)
            optimizer_param_groups(self.scorer, recipe.optim),
            lr=recipe.optim.lr, betas=recipe.optim.betas, eps=recipe.optim.adam_eps,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe, total_optimizer_steps))
        config = deepspeed_config(recipe, recipe.trainer.micro_batch_size, micro_steps_per_minibatch, world_size)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.scorer, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        # RL fine-tuning runs without dropout: the training forward must equal the scoring one (which is
        # why the decoder blocks checkpoint by grad mode, not by train mode: activation_checkpointing.py)
        self.engine.eval()

    @property
    def model(self) -> nn.Module:
        """The HF model inside the engine (what rollout engines sample from)."""
        return self.engine.module.model

    @property
    def is_lora(self) -> bool:
        return is_peft_model(self.model)

    def forward(self, micro: MicroBatch, stats: tuple[str, ...], raw_stats: tuple[str, ...] = (),
                detached_stats: tuple[str, ...] = (), *, temperature: float) -> dict[str, torch.Tensor]:
        """`stats` of `micro`'s response tokens on logits / `temperature` (`RunSettings.temperature`,
        the rollout's: the distribution the samples came from), `raw_stats` also on the raw logits."""
        dropout = torch.is_grad_enabled() and bool(self.adapter_dropouts)
        for module in self.adapter_dropouts:
            module.train(dropout)
        try:
            return self.engine(
                input_ids=micro.input_ids, attention_mask=micro.attention_mask,
                position_ids=micro.position_ids, prompt_length=micro.prompt_length,
                temperature=temperature, stats=stats, raw_stats=raw_stats,
                detached_stats=detached_stats, response_mask=micro.response_mask,
                predict_index=micro.predict_index,
            )
        finally:
            for module in self.adapter_dropouts:
                module.eval()

    @torch.no_grad()
    def score(self, micro: MicroBatch, stats: tuple[str, ...], raw_stats: tuple[str, ...] = (), *,
              temperature: float) -> dict[str, torch.Tensor]:
        return self.forward(micro, stats, raw_stats, temperature=temperature)

    def backward_and_step(self, loss: torch.Tensor, *, last_of_minibatch: bool) -> None:
        """Accumulate one micro-batch; the optimizer steps after the mini-batch's last one.

        The loop marks the boundary itself (`set_gradient_accumulation_boundary`) rather than
        trusting DeepSpeed's counter of `gradient_accumulation_steps` fixed at init: with a token
        budget the number of micro-batches varies from one mini-batch to the next.
        `scale_wrt_gas=False`: the loss is already weighted by mini-batch-wide token weights, so
        DeepSpeed must not divide it again by the number of micro-batches.
        """
        self.engine.set_gradient_accumulation_boundary(last_of_minibatch)
        self.engine.backward(loss, scale_wrt_gas=False)
        if self.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # DeepSpeed records the global norm only for ZeRO/fp16 optimizers; measure it here
            params = [p for p in self.scorer.parameters() if p.grad is not None]
            self._unsharded_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
        self.engine.step()

    def grad_norm(self) -> float:
        """Global gradient norm (before clipping) of the last optimizer step."""
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = getattr(self, "_unsharded_grad_norm", float("nan"))
        return float(norm)

    def restart_lr_schedule(self) -> None:
        """After a resume: set the rate of the next optimizer step from the recipe's schedule at the
        restored position. The restored optimizer holds the rate the checkpoint's schedule set, and
        LambdaLR keeps no lambdas in its state, so a schedule extended by the resume (a larger
        `trainer.total_steps` under cosine) would act only from the step after next: a finished
        cosine run's first resumed step trained at its final rate (0 by default). Unchanged
        recipes get the very value the checkpoint holds (the same product LambdaLR computes)."""
        scheduler = self.scheduler
        for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @contextlib.contextmanager
    def generation_context(self) -> Iterator[nn.Module]:
        """Yield the HF model ready for sampling. Under ZeRO-3 the parameters are gathered for
        the whole generation and the per-module fetch hooks removed, so ranks that finish
        decoding early do not deadlock the others in parameter all-gathers."""
        if self.zero_stage != 3:
            yield self.model
            return
        import deepspeed  # (the same), only under ZeRO-3

        offload = self.engine.optimizer.parameter_offload
        with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
            offload._remove_module_hooks()
            try:
                yield self.model
            finally:
                offload.setup_zero_stage3_hooks()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on every rank (gathered under ZeRO-3), on the CPU; a LoRA
        model's merged, under the base checkpoint's names (`AutoModelForCausalLM` loads them)."""
        if self.is_lora:
            state = dict(iter_weights(self.model, bucket_bytes=2**30, device="cpu"))  # bucket by bucket under ZeRO-3
            lm = causal_lm(self.model)
            params = {name for name, _ in lm.named_parameters(remove_duplicate=False)}
            state.update({k: v.detach().cpu().clone() for k, v in lm.state_dict().items()  # persistent buffers
                          if k not in params and "lora_" not in k and ".base_layer." not in k})
            return share_tied(state, lm)
        with self.generation_context() as model:
            return share_tied({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, model)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """A LoRA model's adapter weights under the PeftModel's names, on every rank, on the CPU
        (what `PeftModel.save_pretrained(state_dict=...)` selects the adapter from)."""
        adapters = [p for p in self.model.parameters() if p.requires_grad]
        with gathered(adapters):
            return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if "lora_" in k}


def share_tied(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state` with every name of one tied parameter (SmolLM2's and Gemma's `lm_head.weight` is
    `embed_tokens.weight`) pointing at one tensor again, as in the model. A copy per name would
    hide the tie from `save_pretrained`, which then writes the matrix twice (113 MB more for
    SmolLM2, 671 MB for Gemma 3 270M) and a reload no longer sees one weight."""
    names_of: dict[int, list[str]] = {}
    prefix = "base_model.model." if is_peft_model(model) else ""
    for name, param in causal_lm(model).named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for names in names_of.values():
        present = [n for n in names if n in state] or [prefix + n for n in names if prefix + n in state]
        for name in present[1:]:
            state[name] = state[present[0]]
    return state


class AdapterOffReference:
    """The initial policy of a LoRA run: the actor's own engine with its adapters switched off
    (`peft`'s `disable_adapter()`), called like a `TokenScorer`. The base weights are frozen, so
    this is exactly the model before step 1, with no second copy in memory."""

    def __init__(self, actor: Actor) -> None:
        self.actor = actor

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.actor.scorer.parameters()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 prompt_length: int, temperature: float, stats: tuple[str, ...],
                 response_mask: torch.Tensor | None = None,
                 predict_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with self.actor.model.disable_adapter():
            return self.actor.engine(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     prompt_length=prompt_length, temperature=temperature, stats=stats,
                                     response_mask=response_mask, predict_index=predict_index)
