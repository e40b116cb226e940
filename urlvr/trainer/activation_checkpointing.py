"""Activation checkpointing of the decoder blocks in the training forward, with the model in eval mode.

Why not transformers' own switch: `gradient_checkpointing_enable()` makes each decoder block (a
`GradientCheckpointingLayer`) checkpoint only while `block.training` is true, and urlvr runs the
actor in eval mode (no dropout: the training forward must equal the scoring forward bit for bit,
so that on-policy importance ratios are exactly 1). Under `engine.eval()` that switch never fired:
0 checkpointed blocks in a step, full activation memory (issue 19). Train mode is no way out
either: besides dropout modules it turns on attention dropout (`attention_dropout if
self.training`), router jitter and auxiliary losses, differently in every model.

Here each block's forward is wrapped, per instance, in `torch.utils.checkpoint` (non-reentrant)
whenever gradients are on, whatever the mode: the block runs its eval-mode forward once in the
forward pass, keeping only its inputs, and once more in the backward pass. Its outputs are those of
the plain forward (the same function on the same inputs), so the scoring pass, which runs under
`no_grad` and is not wrapped, still equals the training forward exactly. The modes of the block's
submodules at forward time are restored for the recompute (LoRA's adapter dropout is on in the
training forward only, and switched off again before the backward), and the RNG state is too
(`preserve_rng_state`), so a dropout mask is recomputed as it was drawn.

Memory: a block keeps its input hidden states (`[b, L, H]`) instead of every intermediate
activation (attention projections, MLP's `[b, L, 4H]`-sized ones, norms); docs/troubleshooting.md
gives measured figures.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.utils.checkpoint
from torch import nn

from urlvr.errors import RecipeError


def checkpoint_decoder_blocks(model: nn.Module) -> int:
    """Make every decoder block of `model` (an HF causal LM, or a PeftModel around one) recompute
    its activations in the backward pass whenever it runs with gradients on; returns the number
    of blocks. Raises RecipeError for a model without transformers' `GradientCheckpointingLayer`
    blocks (remote code written for transformers < 4.52): nothing here could checkpoint it."""
    from transformers.modeling_layers import GradientCheckpointingLayer  # heavy (seconds), loaded on demand

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise RecipeError(f"model.gradient_checkpointing: {type(model).__name__} has no transformers "
                          "GradientCheckpointingLayer decoder blocks to checkpoint; set it false")
    for block in blocks:
        # an instance attribute wins over the class's `forward` in `Module.__call__`; a bound method
        # is re-bound to the copy by `copy.deepcopy`, so a copied model checkpoints its own blocks
        block.forward = types.MethodType(_checkpointed_forward, block)
    return len(blocks)


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    forward = type(block).forward  # transformers' own wrapper: it does not checkpoint in eval mode
    if not torch.is_grad_enabled():  # scoring, generation: nothing to recompute, run as is
        return forward(block, *args, **kwargs)
    modes = [(module, module.training) for module in block.modules()]
    return torch.utils.checkpoint.checkpoint(
        forward, block, *args, use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _modes_as(modes)), **kwargs,
    )


@contextlib.contextmanager
def _modes_as(modes: list[tuple[nn.Module, bool]]) -> Iterator[None]:
    """The recompute runs each submodule in the mode it had in the forward pass."""
    now = [(module, module.training) for module, _ in modes]
    for module, training in modes:
        module.training = training
    try:
        yield
    finally:
        for module, training in now:
            module.training = training
