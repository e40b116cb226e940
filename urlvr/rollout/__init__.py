"""Rollouts: the engine protocol and records (``base``), engines by name (each with its own
recipe section), and collation.

The vLLM engine module is imported (so recipes can name it and set its section) but imports vLLM
itself only when an engine is built: vLLM is the optional ``vllm`` extra.
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
from urlvr.rollout.transformers_engine import (
    TransformersEngineSection,
    TransformersRolloutEngine,
)
from urlvr.rollout.vllm_engine import VLLMEngineSection, VLLMRolloutEngine

__all__ = [
    "ROLLOUT_ENGINES",
    "FinishReason",
    "Group",
    "PromptInput",
    "RolloutBatch",
    "RolloutEngine",
    "Sample",
    "SamplingParams",
    "TransformersEngineSection",
    "TransformersRolloutEngine",
    "VLLMEngineSection",
    "VLLMRolloutEngine",
    "collate_groups",
    "position_ids_from_attention_mask",
]
