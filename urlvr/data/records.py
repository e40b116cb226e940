"""The prompt records: one question as it crosses from the data loaders to the trainer, and the
templated, tokenized form the rollout engines take."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PromptRecord:
    """One prompt before templating. ``label`` feeds metrics and oracle rewards only."""

    prompt_id: str  # stable id, used for per-prompt tracking and resume
    prompt: str  # the user's question, before any template
    label: str | None = None  # ground-truth answer; metrics and oracle rewards only
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PromptInput:
    """One prompt as the engine needs it: already templated and tokenized."""

    prompt_id: str
    text: str
    token_ids: tuple[int, ...]


class DataError(ValueError):
    """Prompt data that cannot be used; the message names the file (or dataset) and the row."""
