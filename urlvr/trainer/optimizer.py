"""Which parameters AdamW decays: the recipe's `optim.weight_decay_exclude`, as parameter groups.

Frameworks differ here and rarely say so. veRL (and so the paper) hands AdamW every parameter in
one group: norm gains and biases decay towards 0 like the matrices. nanoGPT, HF Trainer (and so
TRL) and OpenRLHF spare them: a norm gain pulled towards 0 shrinks its layer's output, and a
bias has no scale symmetry for the decay to regularise. urlvr makes it a recipe choice
(`none` = veRL's, the default and the paper recipes'; `norms_and_biases` = the others').
"""

from __future__ import annotations

from torch import nn

from urlvr.recipe.sections.optimisation import OptimSection


def spared_from_decay(param: nn.Parameter) -> bool:
    """Whether `norms_and_biases` spares ``param``: it has fewer than 2 dimensions.

    nanoGPT's rule (`configure_optimizers`: decay iff `p.dim() >= 2`). In a transformer the 1-D
    parameters are exactly the norm gains (and LayerNorm biases) and the linear layers' biases;
    HF Trainer's name patterns (`get_decay_parameter_names`: nn.LayerNorm modules, names holding
    `bias`, `layernorm`, `rmsnorm`, `norm`, `_norm`) pick the same set on Llama, Qwen2 and GPT-2
    (tests/test_optimizer.py), without depending on how an architecture names its modules.
    Embeddings and the LM head are matrices and decay under both rules."""
    return param.dim() < 2


def optimizer_param_groups(model: nn.Module, optim: OptimSection) -> list[dict]:
    """AdamW parameter groups of ``model``'s trainable parameters, each with its own `weight_decay`.

    `none`: one group at `optim.weight_decay` (veRL's, the state-dict layout of earlier urlvr
    checkpoints). `norms_and_biases`: the matrices at `optim.weight_decay`, then the 1-D
    parameters at 0 (`spared_from_decay`); an empty group is left out. Frozen parameters (a LoRA
    base model) are in no group. Every group sets `weight_decay`: AdamW's own default is 0.01."""
    trained = [p for p in model.parameters() if p.requires_grad]
    if optim.weight_decay_exclude == "none":
        return [{"params": trained, "weight_decay": optim.weight_decay}]
    decayed = [p for p in trained if not spared_from_decay(p)]
    spared = [p for p in trained if spared_from_decay(p)]
    groups = [{"params": decayed, "weight_decay": optim.weight_decay}, {"params": spared, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]
