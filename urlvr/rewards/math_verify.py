"""Answer equivalence with math-verify (`\\frac{1}{2}` = `0.5` = `1/2`), under hard time limits.

math-verify parses with sympy and guards itself with `signal.alarm`, which fails off the main
thread and cannot stop sympy stuck inside C code. `MathVerifier` therefore runs it in a child
process (`urlvr.rewards._math_worker`) and waits at most `timeout_s` per comparison; a late
reply kills and restarts the child, and the comparison counts as "not equivalent". Answers
longer than `max_answer_chars` are compared as strings only.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import select
import subprocess
import sys
import threading
from collections.abc import Sequence

from urlvr.rewards.base import RewardContext, RewardOutput, reward
from urlvr.rollout.base import Group

STARTUP_TIMEOUT_S = 60.0


class MathVerifier:
    """Symbolic answer equivalence in a supervised child process.

    `equivalent(a, b)` returns True/False, or None when math-verify failed or ran out of time
    (callers treat None as "not equivalent" and count it). Thread-safe; the child starts on
    first use and is restarted after a timeout.
    """

    def __init__(self, timeout_s: float = 5.0, max_answer_chars: int = 1000) -> None:
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError("math-verify is not installed: pip install 'math-verify==0.9.0'")
        self.timeout_s = timeout_s
        self.max_answer_chars = max_answer_chars
        self.timeouts = 0  # comparisons abandoned because the child was too slow (restarts)
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def equivalent(self, a: str, b: str) -> bool | None:
        if a == b:
            return True
        if max(len(a), len(b)) > self.max_answer_chars:
            return False
        with self._lock:
            reply = self._ask({"op": "equal", "gold": a, "pred": b, "timeout": max(1, math.ceil(self.timeout_s))})
        return bool(reply["result"]) if reply is not None and reply.get("ok") else None

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    # -- child process plumbing
    def _ask(self, request: dict) -> dict | None:
        process = self._ensure_started()
        try:
            process.stdin.write(json.dumps(request) + "\n")
            process.stdin.flush()
        except (BrokenPipeError, OSError):
            self.close()
            return None
        reply = self._read_line(process, self.timeout_s)
        if reply is None:  # too slow (or died): kill it; the next call starts a fresh one
            self.timeouts += 1
            self.close()
        return reply

    def _ensure_started(self) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "urlvr.rewards._math_worker"], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
            )
            if self._read_line(self._process, STARTUP_TIMEOUT_S) is None:
                self.close()
                raise RuntimeError("the math-verify worker did not start (is math-verify importable?)")
        return self._process

    @staticmethod
    def _read_line(process: subprocess.Popen, timeout_s: float) -> dict | None:
        ready, _, _ = select.select([process.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = process.stdout.readline()
        return json.loads(line) if line else None


_SHARED: dict[tuple[float, int], MathVerifier] = {}


def shared_verifier(timeout_s: float = 5.0, max_answer_chars: int = 1000) -> MathVerifier:
    """One verifier (one child process) per setting, per process; closed at exit."""
    key = (float(timeout_s), int(max_answer_chars))
    if key not in _SHARED:
        _SHARED[key] = MathVerifier(timeout_s, max_answer_chars)
        atexit.register(_SHARED[key].close)
    return _SHARED[key]


def cluster_by_equivalence(
    answers: Sequence[str | None], verifier: MathVerifier | None
) -> tuple[list[int | None], int]:
    """Greedy semantic clustering: each answer joins the first cluster whose representative it
    is equivalent to (EMPO's procedure), else opens a new one. Returns (cluster id per answer,
    None for no answer; comparisons that failed or timed out). `verifier=None`: exact strings."""
    representatives: list[str] = []
    memo: dict[str, int] = {}
    ids: list[int | None] = []
    failures = 0
    for answer in answers:
        if answer is None:
            ids.append(None)
            continue
        if answer not in memo:
            memo[answer] = -1
            if verifier is not None:
                for index, rep in enumerate(representatives):
                    same = verifier.equivalent(rep, answer)
                    failures += same is None
                    if same:
                        memo[answer] = index
                        break
            if memo[answer] < 0:
                memo[answer] = len(representatives)
                representatives.append(answer)
        ids.append(memo[answer])
    return ids, failures


@reward("math_verify", needs_label=True, family="verdict")
def math_verify_reward(group: Group, ctx: RewardContext, *, timeout_s: float = 5.0) -> RewardOutput:
    """Oracle: r(y) = 1[ans(y) is equivalent to a* by math-verify]; no answer or a timeout scores 0."""
    if ctx.label is None:
        raise ValueError(f"prompt {group.prompt.prompt_id!r} has no label for the math_verify reward")
    verifier = shared_verifier(timeout_s)
    # one worker round trip per distinct answer: collapsing groups repeat a few answers many times
    verdict = {a: verifier.equivalent(ctx.label, a) for a in dict.fromkeys(ctx.answers) if a is not None}
    verdicts = [None if a is None else verdict[a] for a in ctx.answers]
    return RewardOutput(
        scores=[float(v is True) for v in verdicts],
        diagnostics={"failed": [float(a is not None and v is None) for a, v in zip(ctx.answers, verdicts)]},
    )
