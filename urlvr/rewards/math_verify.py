"""Answer equivalence with math-verify (`\\frac{1}{2}` = `0.5` = `1/2`), under hard time limits.

math-verify runs in supervised child processes (`urlvr.rewards.math_workers`): a comparison gets
`timeout_s` seconds of its own -- starting a worker or waiting for one is never billed to it --
and one that runs out of time has no verdict and says so (`compare` -> (None, timed_out=True)).
The rewards score it 0 -- an answer that is slow to check must never earn more than a wrong one,
or the policy learns to stall the verifier -- and count it (`RewardOutput.timeouts`, logged as
`reward/<term>_timeouts`). Answers longer than `max_answer_chars` are compared as strings only.

One pathological answer (`10^{10^{10^{10}}}`) costs a whole `timeout_s`; a group of 64 of them,
clustered pairwise, would cost minutes. So a reward checks a whole step's comparisons in one
`VerificationBudget`: one clock for all of them (`budget_s`; it stops while a worker starts), one
verdict cache (a pair is asked once per step, however many groups or representatives repeat it),
parallel workers, and a count of the comparisons cut short -- by their own timeout or by the
step's budget -- which the rewards report as timeouts (and the `cut_short` diagnostic).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from urlvr.rewards.base import RewardContext, RewardOutput, reward
from urlvr.rewards.extractors import normalize_answer
from urlvr.rewards.math_workers import (  # noqa: F401  (MathVerifier, BudgetClock: part of this module's API)
    DEFAULT_TIMEOUT_S,
    DEFAULT_WORKERS,
    BudgetClock,
    MathVerifier,
    shared_verifier,
)
from urlvr.rollout.base import Group

DEFAULT_BUDGET_S = 30.0  # per step and reward term, all comparisons together


def check_verification_kwargs(*, timeout_s: float = DEFAULT_TIMEOUT_S, budget_s: float = DEFAULT_BUDGET_S,
                              workers: int = DEFAULT_WORKERS, **_: object) -> None:
    """Load-time check of the verification knobs a reward term takes."""
    for name, value in (("timeout_s", timeout_s), ("budget_s", budget_s)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0 seconds, got {value}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")


class VerificationBudget:
    """One step's comparisons: a shared clock, a verdict cache and parallel workers.

    `verdicts(pairs)` asks every uncached distinct pair at once (up to `verifier.workers` in
    parallel); once `budget_s` has run on the budget's clock since it was opened (the clock stops
    while a worker starts), the remaining pairs are not asked and in-flight ones are stopped, all
    counting as cut short (verdict None). Verdicts -- None included -- are cached for the
    budget's life, so a step pays for each pair once.
    """

    def __init__(self, verifier: MathVerifier | None, budget_s: float = DEFAULT_BUDGET_S) -> None:
        self.verifier = verifier  # None: exact string equality, nothing to budget
        self.clock = BudgetClock(budget_s)
        self._verdicts: dict[tuple[str, str], bool | None] = {}
        self._cut_short: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def verdicts(self, pairs: Sequence[tuple[str, str]]) -> list[bool | None]:
        """a ≡ b for each (a, b): True, False, or None (unverified: failed or cut short)."""
        if self.verifier is None:
            return [a == b for a, b in pairs]
        with self._lock:
            todo = [p for p in dict.fromkeys(pairs) if p not in self._verdicts]
        if todo:
            def compare(pair: tuple[str, str]) -> tuple[bool | None, bool]:
                return self.verifier.compare(*pair, clock=self.clock)

            if len(todo) == 1:
                results = [compare(todo[0])]
            else:
                with ThreadPoolExecutor(max_workers=min(len(todo), self.verifier.workers)) as pool:
                    results = list(pool.map(compare, todo))
            with self._lock:
                for pair, (verdict, cut) in zip(todo, results):
                    self._verdicts[pair] = verdict
                    if cut:
                        self._cut_short.add(pair)
        with self._lock:
            return [self._verdicts[p] for p in pairs]

    def cut_short(self, pair: tuple[str, str]) -> bool:
        """Whether this pair's verdict is missing because time ran out."""
        return pair in self._cut_short

    @property
    def cut_short_count(self) -> int:
        """Distinct comparisons cut short under this budget so far."""
        return len(self._cut_short)


@dataclass(frozen=True)
class Clustering:
    ids: list[int | None]  # cluster id per answer, None for no answer
    failures: int  # comparisons without a verdict (failed or cut short)
    cut_short: int  # of those, the ones cut short by time


def cluster_by_equivalence(answers: Sequence[str | None], budget: VerificationBudget) -> Clustering:
    """Greedy semantic clustering: each answer joins the first cluster whose representative it
    is equivalent to (EMPO's procedure), else opens a new one. A new answer is compared with
    every representative at once (in parallel); the first match wins, as in the sequential scan."""
    representatives: list[str] = []
    memo: dict[str, int] = {}
    ids: list[int | None] = []
    failures = cut_short = 0
    for answer in answers:
        if answer is None:
            ids.append(None)
            continue
        if answer not in memo:
            pairs = [(rep, answer) for rep in representatives]
            verdicts = budget.verdicts(pairs)
            failures += sum(v is None for v in verdicts)
            cut_short += sum(budget.cut_short(p) for p, v in zip(pairs, verdicts) if v is None)
            memo[answer] = next((i for i, same in enumerate(verdicts) if same), len(representatives))
            if memo[answer] == len(representatives):
                representatives.append(answer)
        ids.append(memo[answer])
    return Clustering(ids, failures, cut_short)


def _label_verdicts(ctx: RewardContext, budget: VerificationBudget) -> list[tuple[bool | None, bool]]:
    """(verdict, cut short) per sample against the label; an answer equal to the normalised
    label (`8000` for a label `8,000`) needs no worker."""
    target = normalize_answer(ctx.label)
    pairs = {a: (ctx.label, a) for a in ctx.answers if a is not None and a != target}
    verdict = dict(zip(pairs, budget.verdicts(list(pairs.values()))))
    return [(None, False) if a is None else (True, False) if a == target else (verdict[a], budget.cut_short(pairs[a]))
            for a in ctx.answers]


def _verify_step(
    groups: Sequence[Group], contexts: Sequence[RewardContext], policy: object, *, timeout_s: float = DEFAULT_TIMEOUT_S,
    budget_s: float = DEFAULT_BUDGET_S, workers: int = DEFAULT_WORKERS,
) -> list[list[tuple[bool | None, bool]] | None]:
    """Batch phase: every (label, answer) pair of the step, in parallel, under one budget."""
    budget = VerificationBudget(shared_verifier(timeout_s, workers=workers), budget_s)
    labelled = [ctx for ctx in contexts if ctx.label is not None]
    target = {id(ctx): normalize_answer(ctx.label) for ctx in labelled}
    budget.verdicts([(ctx.label, a) for ctx in labelled for a in dict.fromkeys(ctx.answers)
                     if a is not None and a != target[id(ctx)]])  # all at once: parallel across groups
    return [_label_verdicts(ctx, budget) if ctx.label is not None else None for ctx in contexts]


@reward("math_verify", needs_label=True, prepare=_verify_step, family="verdict", timed=True)
def math_verify_reward(
    group: Group, ctx: RewardContext, *, timeout_s: float = DEFAULT_TIMEOUT_S, budget_s: float = DEFAULT_BUDGET_S,
    workers: int = DEFAULT_WORKERS,
) -> RewardOutput:
    """Oracle: r(y) = 1[ans(y) is equivalent to a* by math-verify]; no answer or no verdict scores 0.

    `timeout_s`: the limit of one comparison, in seconds.
    `budget_s`: the limit of all comparisons of a step (when called outside a step, of this group), in seconds.
    `workers`: the child processes that compare in parallel. A sample whose comparison
    ran out of time scores 0, like a wrong one (a slow-to-check answer must not pay), and is
    counted in `timeouts`. Diagnostics: `failed` (no verdict) and `cut_short` (no verdict because
    time ran out), per sample.
    """
    if ctx.label is None:
        raise ValueError(f"prompt {group.prompt.prompt_id!r} has no label for the math_verify reward")
    if ctx.prepared is not None:
        verdicts = ctx.prepared
    else:
        verdicts = _label_verdicts(ctx, VerificationBudget(shared_verifier(timeout_s, workers=workers), budget_s))
    return RewardOutput(
        scores=[float(v is True) for v, _ in verdicts],
        diagnostics={"failed": [float(a is not None and v is None) for a, (v, _) in zip(ctx.answers, verdicts)],
                     "cut_short": [float(cut) for _, cut in verdicts]},
        timeouts=sum(cut for _, cut in verdicts),
    )


math_verify_reward.check = check_verification_kwargs  # type: ignore[attr-defined]
