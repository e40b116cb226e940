"""The reward API: a reward sees a whole group and a context, and returns one score per sample.

    @reward("my_reward")
    def my_reward(group: Group, ctx: RewardContext, *, bonus: float = 0.0) -> list[float]:
        return [float(a is not None) + bonus for a in ctx.answers]

Why whole groups: ensemble rewards (majority vote, clustering) need every sibling's answer, and
certainty rewards need the per-token statistics the trainer already computed in its scoring
pass -- the context lends both, so neither needs a second forward pass or a custom manager.
Labels are lent only to rewards registered with ``needs_label=True`` (oracles); any other
reward touching ``ctx.label`` gets an error, so labels cannot leak into the training signal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from urlvr.registry import Registry
from urlvr.rollout.base import Group


class LabelAccessError(RuntimeError):
    """A reward not registered as an oracle asked for the ground-truth label."""


@dataclass(frozen=True)
class RewardContext:
    """What the trainer lends a reward for one group (G samples, T response positions)."""

    answers: tuple[str | None, ...]  # extracted answer per sample (None = no answer found)
    response_mask: torch.Tensor  # [G, T]
    token_stats: Mapping[str, torch.Tensor]  # name -> [G, T]: logprob, entropy, self_certainty, top1_prob, top2_prob
    extract_answer: Callable[[str], str | None]
    metadata: Mapping[str, Any] = field(default_factory=dict)  # the prompt record's metadata
    policy: Any = None  # a handle to generate with the current policy (self-verification)
    _label: str | None = None
    _label_allowed: bool = False

    @property
    def label(self) -> str | None:
        """The prompt's ground-truth answer; only oracle rewards (needs_label=True) may read it."""
        if not self._label_allowed:
            raise LabelAccessError(
                "this reward is not registered with needs_label=True, so it cannot read the label "
                "(labels feed metrics and oracle rewards only)"
            )
        return self._label

    @property
    def has_label(self) -> bool:
        return self._label is not None

    def with_label_access(self, allowed: bool) -> RewardContext:
        return replace(self, _label_allowed=allowed)


@dataclass(frozen=True)
class RewardOutput:
    """Scores plus optional named per-sample diagnostics (logged as `reward/<term>/<name>`)."""

    scores: Sequence[float]
    diagnostics: Mapping[str, Sequence[float]] = field(default_factory=dict)


RewardFn = Callable[..., "Sequence[float] | RewardOutput"]


@dataclass(frozen=True)
class RewardSpec:
    name: str
    fn: RewardFn
    needs_label: bool
    description: str


REWARDS: Registry[RewardSpec] = Registry("reward")


def reward(name: str, *, needs_label: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Register ``fn(group, ctx, **kwargs)`` as a reward named ``name``; returns fn unchanged."""

    def add(fn: RewardFn) -> RewardFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        REWARDS.register(name)(RewardSpec(name, fn, needs_label, doc[0] if doc else ""))
        return fn

    return add


def call_reward(spec: RewardSpec, group: Group, ctx: RewardContext, kwargs: Mapping[str, Any]) -> RewardOutput:
    """Run one reward on one group and check it returned one finite float per sample."""
    out = spec.fn(group, ctx.with_label_access(spec.needs_label), **kwargs)
    if not isinstance(out, RewardOutput):
        out = RewardOutput(scores=out)
    scores = [float(s) for s in out.scores]
    if len(scores) != group.size:
        raise ValueError(f"reward {spec.name!r} returned {len(scores)} scores for a group of {group.size}")
    if not all(torch.isfinite(torch.tensor(scores, dtype=torch.float64))):
        raise ValueError(f"reward {spec.name!r} returned a non-finite score: {scores}")
    return RewardOutput(scores=scores, diagnostics=out.diagnostics)
