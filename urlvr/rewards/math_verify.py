"""Answer equivalence with math-verify (`\\frac{1}{2}` = `0.5` = `1/2`), under hard time limits.

math-verify parses with sympy and guards itself with `signal.alarm`, which fails off the main
thread and cannot stop sympy stuck inside C code. `MathVerifier` therefore runs it in child
processes (`urlvr.rewards._math_worker`, up to `workers` of them, so independent comparisons run
in parallel) and waits at most `timeout_s` per comparison; a late reply kills and restarts that
child, and the comparison counts as "not equivalent". Answers longer than `max_answer_chars` are
compared as strings only.

One pathological answer (`10^{10^{10^{10}}}`) costs a whole `timeout_s`; a group of 64 of them,
clustered pairwise, would cost minutes. So a reward checks a whole step's comparisons in one
`VerificationBudget`: one deadline for all of them (`budget_s`), one verdict cache (a pair is
asked once per step, however many groups or representatives repeat it), parallel workers, and a
count of the comparisons cut short -- by their own timeout or by the step's deadline -- which the
rewards report as the `cut_short` diagnostic.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from urlvr.rewards.base import RewardContext, RewardOutput, reward
from urlvr.rewards.extractors import normalize_answer
from urlvr.rollout.base import Group

STARTUP_TIMEOUT_S = 60.0
DEFAULT_TIMEOUT_S = 5.0  # per comparison
DEFAULT_BUDGET_S = 30.0  # per step and reward term, all comparisons together
DEFAULT_WORKERS = 4  # child processes (each holds sympy: ~150 MB)


class _Worker:
    """One math-verify child process; restarted in the background when it has to be killed."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.ready = False
        self.spawned_at = 0.0

    def ask(self, request: dict, timeout_s: float) -> tuple[dict | None, bool]:
        """(reply, late): the reply, or None with late=True when it did not come in time."""
        if self.process is None or self.process.poll() is not None:
            self.spawn()
        if not self.ready and not self._wait_ready(timeout_s):
            return None, True
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            self.kill()
            return None, False
        ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, timeout_s))
        line = self.process.stdout.readline() if ready else None
        if not line:  # too slow (or died): kill it and start a fresh one now, so it warms up meanwhile
            self.kill()
            self.spawn()
            return None, line is None
        return json.loads(line), False

    def _wait_ready(self, timeout_s: float) -> bool:
        startup_left = STARTUP_TIMEOUT_S - (time.monotonic() - self.spawned_at)
        ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, min(timeout_s, startup_left)))
        died = False
        if ready:
            self.ready = bool(self.process.stdout.readline())
            died = not self.ready  # end of file: the child exited
        if not self.ready and (died or self.process.poll() is not None or timeout_s >= startup_left):
            self.kill()
            raise RuntimeError("the math-verify worker did not start (is math-verify importable?)")
        return self.ready  # not ready yet: the caller's deadline came first; it keeps starting

    def spawn(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "urlvr.rewards._math_worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self.ready, self.spawned_at = False, time.monotonic()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process, self.ready = None, False


class MathVerifier:
    """Symbolic answer equivalence in supervised child processes.

    `equivalent(a, b)` returns True/False, or None when math-verify failed or ran out of time
    (callers treat None as "not equivalent" and count it). Thread-safe: up to `workers`
    comparisons run at once, each in its own child; children start on first use and are
    restarted after a timeout.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, max_answer_chars: int = 1000,
                 workers: int = DEFAULT_WORKERS) -> None:
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError("math-verify is not installed: pip install 'math-verify==0.9.0'")
        if workers < 1:
            raise ValueError(f"math-verify needs at least one worker, got {workers}")
        self.timeout_s = timeout_s
        self.max_answer_chars = max_answer_chars
        self.workers = workers
        self.timeouts = 0  # comparisons cut short (own timeout or a budget's deadline), over the lifetime
        self._all = [_Worker() for _ in range(workers)]
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()  # LIFO: reuse a warm child first
        for worker in self._all:
            self._idle.put(worker)
        self._count_lock = threading.Lock()

    def equivalent(self, a: str, b: str, deadline: float | None = None) -> bool | None:
        """a ≡ b? None when unverified. `deadline` (time.monotonic()) cuts the wait short."""
        return self.compare(a, b, deadline)[0]

    def compare(self, a: str, b: str, deadline: float | None = None) -> tuple[bool | None, bool]:
        """(verdict, cut_short): the verdict (None when unverified), and whether time ran out --
        the comparison's own `timeout_s` or the `deadline`, while waiting for a free worker or for
        the reply."""
        if a == b:
            return True, False
        if max(len(a), len(b)) > self.max_answer_chars:
            return False, False
        left = math.inf if deadline is None else deadline - time.monotonic()
        if left <= 0:
            return self._cut()
        try:
            worker = self._idle.get(timeout=None if math.isinf(left) else left)
        except queue.Empty:
            return self._cut()
        try:
            wait = min(self.timeout_s, math.inf if deadline is None else deadline - time.monotonic())
            if wait <= 0:
                return self._cut()
            reply, late = worker.ask({"op": "equal", "gold": a, "pred": b, "timeout": max(1, math.ceil(wait))}, wait)
        finally:
            self._idle.put(worker)
        if late:
            return self._cut()
        return (bool(reply["result"]) if reply is not None and reply.get("ok") else None), False

    def _cut(self) -> tuple[None, bool]:
        with self._count_lock:
            self.timeouts += 1
        return None, True

    def close(self) -> None:
        for worker in self._all:
            worker.kill()


_SHARED: dict[tuple[float, int, int], MathVerifier] = {}


def shared_verifier(timeout_s: float = DEFAULT_TIMEOUT_S, max_answer_chars: int = 1000,
                    workers: int = DEFAULT_WORKERS) -> MathVerifier:
    """One verifier (its child processes) per setting, per process; closed at exit."""
    key = (float(timeout_s), int(max_answer_chars), int(workers))
    if key not in _SHARED:
        _SHARED[key] = MathVerifier(timeout_s, max_answer_chars, workers)
        atexit.register(_SHARED[key].close)
    return _SHARED[key]


def check_verification_kwargs(*, timeout_s: float = DEFAULT_TIMEOUT_S, budget_s: float = DEFAULT_BUDGET_S,
                              workers: int = DEFAULT_WORKERS, **_: object) -> None:
    """Load-time check of the verification knobs a reward term takes."""
    for name, value in (("timeout_s", timeout_s), ("budget_s", budget_s)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0 seconds, got {value}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")


class VerificationBudget:
    """One step's comparisons: a shared deadline, a verdict cache and parallel workers.

    `verdicts(pairs)` asks every uncached distinct pair at once (up to `verifier.workers` in
    parallel); once `budget_s` has passed since the budget was opened, the remaining pairs are
    not asked and in-flight ones are stopped, all counting as cut short (verdict None). Verdicts
    -- None included -- are cached for the budget's life, so a step pays for each pair once.
    """

    def __init__(self, verifier: MathVerifier | None, budget_s: float = DEFAULT_BUDGET_S) -> None:
        if budget_s <= 0:
            raise ValueError(f"budget_s must be > 0, got {budget_s}")
        self.verifier = verifier  # None: exact string equality, nothing to budget
        self.deadline = time.monotonic() + budget_s
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
                return self.verifier.compare(*pair, deadline=self.deadline)

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


@reward("math_verify", needs_label=True, prepare=_verify_step, family="verdict")
def math_verify_reward(
    group: Group, ctx: RewardContext, *, timeout_s: float = DEFAULT_TIMEOUT_S, budget_s: float = DEFAULT_BUDGET_S,
    workers: int = DEFAULT_WORKERS,
) -> RewardOutput:
    """Oracle: r(y) = 1[ans(y) is equivalent to a* by math-verify]; no answer or no verdict scores 0.

    `timeout_s` per comparison; `budget_s` for all comparisons of a step (when called outside a
    step, of this group); `workers` child processes compare in parallel. Diagnostics: `failed`
    (no verdict) and `cut_short` (no verdict because time ran out), per sample.
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
    )


math_verify_reward.check = check_verification_kwargs  # type: ignore[attr-defined]
