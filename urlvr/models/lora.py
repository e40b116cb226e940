"""LoRA through `peft`: wrap a causal LM in adapters, and read its weights back under the base
checkpoint's names, merged, without touching the trained module.

Why the names: vLLM's weight loader and `AutoModelForCausalLM` know the base model's names
(``model.layers.0.self_attn.q_proj.weight``); a PeftModel's parameters are
``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` plus ``lora_A``/``lora_B``.
`checkpoint_weights` maps one to the other and pairs each adapted weight with its LoRA layer, so
a consumer (weight sync, the merged export) computes ``W + scaling * B @ A`` into a fresh tensor.
Why not ``merge_adapter()``/``unmerge_adapter()``: merging in place and subtracting again leaves
the base weights off by float rounding after every sync, and the base must stay bit-identical
(it is the KL reference and is never saved in a checkpoint).

Why the embeddings are refused: the LM head is tied to the token embeddings in many models, and
a merged head would then differ from the embeddings in the trainer but not in vLLM (which ties
them); the trainer's chunked scorer also applies the head's weight directly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from urlvr.errors import RecipeError


def apply_lora(model: nn.Module, section: Any) -> nn.Module:
    """Wrap ``model`` in fresh LoRA adapters as ``model.lora`` (a LoraSection) describes; every
    base parameter is frozen, only the adapters train."""
    from peft import LoraConfig, get_peft_model  # heavy (seconds), loaded on demand: only under model.lora

    config = LoraConfig(r=section.rank, lora_alpha=section.alpha, lora_dropout=section.dropout,
                        target_modules=section.target_modules, bias="none", task_type="CAUSAL_LM")
    embeddings = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:  # e.g. a module name the model does not have
        raise RecipeError(f"model.lora.target_modules: {err}") from None
    adapted = [name for name, module in peft_model.named_modules() if _is_lora_layer(module)
               and id(module.get_base_layer()) in embeddings]
    if adapted:
        raise RecipeError(f"model.lora.target_modules matched the embeddings or the LM head ({adapted}); LoRA there is "
                          "not supported (docs/lora.md): target the decoder's linear layers, e.g. `all-linear`")
    return peft_model


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def causal_lm(model: nn.Module) -> nn.Module:
    """The HF causal LM: ``model`` itself, or the one a PeftModel wraps (its LoRA layers are
    injected in place, so a forward through it applies the adapters)."""
    return model.get_base_model() if is_peft_model(model) else model


def checkpoint_weights(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Module | None]]:
    """``(base checkpoint name, parameter, LoRA layer whose delta adds to it or None)`` for every
    weight of the model, every name a tied weight goes by included; adapter parameters are not
    listed (they live in the merged weights). For a plain model: its named parameters, no layers."""
    if not is_peft_model(model):
        return [(name, param, None) for name, param in model.named_parameters(remove_duplicate=False)]
    lm = model.get_base_model()
    layers = {name: module for name, module in lm.named_modules() if _is_lora_layer(module)}
    out = []
    for name, param in lm.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        if any(part.startswith("lora_") for part in parts):
            continue
        if "base_layer" in parts:
            at = parts.index("base_layer")
            owner = ".".join(parts[:at])
            name = ".".join(parts[:at] + parts[at + 1:])
            out.append((name, param, layers.get(owner) if parts[at + 1:] == ["weight"] else None))
        else:
            out.append((name, param, None))
    return out


def adapter_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The active adapters' A and B matrices of one LoRA layer (what its delta is computed from)."""
    return [p for name in _active(layer) for p in (*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters())]


def merged_weight(param: torch.Tensor, layer: nn.Module | None) -> torch.Tensor:
    """``W + sum over active adapters of scaling * B @ A`` as a new float32 tensor (``W`` itself
    when there is no layer, or its adapters are off). Parameters must be gathered under ZeRO-3."""
    weight = param.detach().float()
    if layer is None or layer.disable_adapters:
        return weight
    for name in _active(layer):
        weight = weight + layer.get_delta_weight(name).detach().float()
    return weight


def _active(layer: nn.Module) -> list[str]:
    return [name for name in layer.active_adapters if name in layer.lora_A]


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer  # heavy, loaded on demand: only under model.lora

    return isinstance(module, LoraLayer)
