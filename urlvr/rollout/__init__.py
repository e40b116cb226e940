"""Rollouts: the engine protocol and records (``base``), engines by name, and collation.

The vLLM engine is not imported here: it needs the optional ``vllm`` extra.
"""

from urlvr.rollout.base import (
    ROLLOUT_ENGINES,
    FinishReason,
    Group,
    PromptInput,
    RolloutBatch,
    RolloutEngine,
    Sample,
    SamplingParams,
)
from urlvr.rollout.collate import collate_groups, position_ids_from_attention_mask
from urlvr.rollout.transformers_engine import TransformersRolloutEngine

__all__ = [
    "ROLLOUT_ENGINES",
    "FinishReason",
    "Group",
    "PromptInput",
    "RolloutBatch",
    "RolloutEngine",
    "Sample",
    "SamplingParams",
    "TransformersRolloutEngine",
    "collate_groups",
    "position_ids_from_attention_mask",
]
