"""Scores for a whole rollout batch: the recipe's weighted (optionally gated) terms, plus the
oracle for metrics.

    total[b, j] = sum_k weight_k * gate_k[b, j] * term_k[b, j]

A term that raises stops the run with a `RewardError` naming the reward and the prompt (and the
sample, when the reward says which), unless the recipe sets `on_error: zero`; then the group's
scores are 0 and the failure is counted in `errors` (logged as `reward/<term>/error_rate`).
A term -- or the oracle -- whose reward verifies under a time limit (`timed`) counts the
verifications that ran out of time in `timeouts` (logged as `reward/<term>_timeouts`, the oracle's
as `reward/oracle_timeouts`), every step, 0 included.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from urlvr.recipe.sections.reward import reward_family  # noqa: F401  (its old home; the recipe's checks read it too)
from urlvr.rewards.base import (
    REWARDS,
    LabelAccessError,
    PolicyHandle,
    RewardContext,
    RewardSpec,
    call_reward,
)
from urlvr.rollout.base import Group


class RewardError(RuntimeError):
    """A reward raised while scoring; the message names the reward, the prompt and the cause."""


@dataclass(frozen=True)
class RewardTermSpec:
    name: str
    weight: float
    kwargs: Mapping[str, Any]
    alias: str | None = None  # the recipe's `reward.terms[].alias`
    gate: str | None = None  # a reward whose scores multiply this term's
    on_error: str = "raise"  # "raise" | "zero"

    @property
    def metric_name(self) -> str:
        """The term's name in metrics and in `BatchRewards.per_term`: its `alias`, else the reward's name
        (as `RewardTerm.metric_name`; `label` is the ground truth's name elsewhere)."""
        return self.alias or self.name


@dataclass(frozen=True)
class BatchRewards:
    total: torch.Tensor  # [B, G] the training reward (weighted sum of terms)
    per_term: dict[str, torch.Tensor]  # term metric_name -> [B, G] (after its gate)
    oracle: torch.Tensor | None  # [B, G], NaN rows where a prompt has no label; None if no oracle
    diagnostics: dict[str, torch.Tensor]  # "<term>/<name>" -> [B, G], NaN where a group failed
    errors: dict[str, float] = field(default_factory=dict)  # term metric_name (on_error=zero) -> share of groups zeroed
    timeouts: dict[str, int] = field(default_factory=dict)  # timed term metric_name (or "oracle") -> verifications out of time


def score_batch(
    groups: Sequence[Group],
    contexts: Sequence[RewardContext],
    terms: Sequence[RewardTermSpec],
    oracle: str | None,
    policy: PolicyHandle | None = None,
) -> BatchRewards:
    """Call every term once per group (never per sample), and the oracle where labels exist."""
    per_term: dict[str, torch.Tensor] = {}
    diagnostics: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    timeouts: dict[str, int] = {}
    gates: dict[str, torch.Tensor] = {}
    for term in terms:
        spec = REWARDS.get(term.name)
        scores, diag, failed, timed_out = run_term(spec, term.kwargs, groups, contexts, policy, term.on_error)
        if term.gate is not None:
            if term.gate not in gates:
                gates[term.gate] = run_term(REWARDS.get(term.gate), {}, groups, contexts, policy, "raise")[0]
            scores = scores * gates[term.gate]
        per_term[term.metric_name] = scores
        diagnostics.update({f"{term.metric_name}/{k}": v for k, v in diag.items()})
        if term.on_error == "zero":
            errors[term.metric_name] = failed / max(1, len(groups))
        if spec.is_timed(term.kwargs):
            timeouts[term.metric_name] = timed_out
    total = sum(term.weight * per_term[term.metric_name] for term in terms)
    oracle_scores, oracle_timeouts = _oracle_scores(groups, contexts, oracle, policy)
    if oracle is not None and REWARDS.get(oracle).is_timed({}):
        timeouts["oracle"] = oracle_timeouts
    return BatchRewards(total=total, per_term=per_term, oracle=oracle_scores, diagnostics=diagnostics,
                        errors=errors, timeouts=timeouts)


def run_term(
    spec: RewardSpec, kwargs: Mapping[str, Any], groups: Sequence[Group], contexts: Sequence[RewardContext],
    policy: PolicyHandle | None, on_error: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, int]:
    """One reward over the batch: (scores [B, G], diagnostics, number of groups that failed,
    number of verifications that ran out of time)."""
    if on_error not in ("raise", "zero"):
        raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
    prepared: Sequence[Any] = [None] * len(groups)
    failed_groups: set[int] = set()
    if spec.prepare is not None:  # the batch phase: one call over every group (e.g. one generate)
        try:
            prepared = _prepare(spec, groups, contexts, policy, kwargs)
        except LabelAccessError:
            raise
        except Exception as err:
            if on_error == "raise":
                raise RewardError(f"reward {spec.name!r} failed in its batch phase: {type(err).__name__}: {err}") from err
            failed_groups = set(range(len(groups)))
    rows: list[list[float]] = []
    diag_rows: list[dict[str, Sequence[float]]] = []
    timeouts = 0
    for index, (group, ctx) in enumerate(zip(groups, contexts, strict=True)):
        out = None
        if index not in failed_groups:
            try:
                out = call_reward(spec, group, replace(ctx, prepared=prepared[index], policy=policy), kwargs)
            except LabelAccessError:  # a leak attempt is a bug in the reward, never scored away
                raise
            except Exception as err:
                if on_error == "raise":
                    raise RewardError(_describe_failure(spec.name, group, err)) from err
                failed_groups.add(index)
        rows.append(list(out.scores) if out is not None else [0.0] * group.size)
        timeouts += out.timeouts if out is not None else 0
        diag_rows.append(dict(out.diagnostics) if out is not None else {})
    keys = sorted({k for d in diag_rows for k in d})
    diagnostics = {
        k: torch.tensor([[float(v) for v in d[k]] if k in d else [float("nan")] * g.size
                         for d, g in zip(diag_rows, groups)], dtype=torch.float32)
        for k in keys
    }
    return torch.tensor(rows, dtype=torch.float32), diagnostics, len(failed_groups), timeouts


def _prepare(spec: RewardSpec, groups, contexts, policy, kwargs: Mapping[str, Any]) -> Sequence[Any]:
    params = inspect.signature(spec.prepare).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    own = {k: v for k, v in kwargs.items() if takes_all or k in params}
    visible = [ctx.with_label_access(spec.needs_label) for ctx in contexts]
    prepared = list(spec.prepare(groups, visible, policy, **own))
    if len(prepared) != len(groups):
        raise ValueError(f"reward {spec.name!r}: its batch phase returned {len(prepared)} items for {len(groups)} groups")
    return prepared


def _describe_failure(name: str, group: Group, err: Exception) -> str:
    where = f"prompt {group.prompt.prompt_id!r}"
    index = getattr(err, "sample_index", None)
    if isinstance(index, int) and 0 <= index < group.size:
        text = group.samples[index].text
        where += f", sample {index} ({text[:200]!r}{'...' if len(text) > 200 else ''})"
    return (f"reward {name!r} failed on {where}: {type(err).__name__}: {err} "
            "(set `on_error: zero` on the term to score such groups 0 and count them instead)")


def _oracle_scores(
    groups: Sequence[Group], contexts: Sequence[RewardContext], oracle: str | None, policy: PolicyHandle | None,
) -> tuple[torch.Tensor | None, int]:
    """The oracle's scores [B, G], NaN rows where a prompt has no label, and its timeouts. Run like
    a term over the labelled groups, so its batch phase (e.g. one verification budget for the step)
    applies too. Its diagnostics are not logged: a rank without labelled prompts would lack their
    keys, and per-step metrics must have the same keys on every rank (its timeout count, 0 on such
    a rank, has its key on every rank)."""
    labelled = [i for i, ctx in enumerate(contexts) if ctx.has_label]
    if oracle is None or not labelled:
        return None, 0
    scores, _, _, timeouts = run_term(REWARDS.get(oracle), {}, [groups[i] for i in labelled],
                                      [contexts[i] for i in labelled], policy, "raise")
    out = torch.full((len(groups), scores.shape[1]), float("nan"))
    out[torch.tensor(labelled)] = scores
    return out, timeouts
