"""Rollouts: the engine protocol and records (``base``), engines by name, and collation.

The vLLM engine module is imported (so recipes can name it) but imports vLLM itself only when
an engine is built: vLLM is the optional ``vllm`` extra.
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
from urlvr.rollout.vllm_engine import VLLMRolloutEngine

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
    "VLLMRolloutEngine",
    "collate_groups",
    "position_ids_from_attention_mask",
]
