"""The recipe: pydantic sections, the single source of truth for a run's configuration.

One module per group of sections: `data`, `generation` (model, rollout), `reward`,
`optimisation` (algorithm, optim, trainer), `monitoring` (logging, eval, dynamics, collapse), and
`recipe`, which assembles them; the shared `Section` base class lives in the leaf `urlvr.section`.

Defaults are the paper's Table 7 (GRPO, temperature 1.0, 64 prompts per step, mini-batch 64 =
pure on-policy, 8 samples per prompt, no KL/entropy regularisation, lr 1e-6, 1 epoch, max prompt
1024 and response 7168 tokens). Every field carries a docstring (it becomes the JSON-schema
description and the docs' recipe reference) and bounds; unknown keys are refused.
Names of registered parts (rewards, losses, ...) are checked against their registries here, at
load time, so a typo fails before step 1.
"""

from __future__ import annotations

from urlvr.section import Section
from urlvr.recipe.sections.data import DataSource, DataSection
from urlvr.recipe.sections.generation import ModelSection, RolloutSection
from urlvr.recipe.sections.reward import RewardTerm, RewardSection
from urlvr.recipe.sections.optimisation import (
    AlgorithmSection,
    DeepSpeedSection,
    OptimSection,
    TrainerSection,
)
from urlvr.recipe.sections.monitoring import (
    WandbSection,
    LoggingSection,
    EvalSection,
    DynamicsSection,
    DetectorSpec,
    CollapseSection,
)
from urlvr.recipe.sections.recipe import Recipe

__all__ = [
    "Section",
    "DataSource",
    "DataSection",
    "ModelSection",
    "RolloutSection",
    "RewardTerm",
    "RewardSection",
    "AlgorithmSection",
    "DeepSpeedSection",
    "OptimSection",
    "TrainerSection",
    "WandbSection",
    "LoggingSection",
    "EvalSection",
    "DynamicsSection",
    "DetectorSpec",
    "CollapseSection",
    "Recipe",
]
