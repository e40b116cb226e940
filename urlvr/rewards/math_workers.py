"""math-verify in supervised child processes, under time limits that bill only the comparison.

math-verify parses with sympy, which can run for minutes on a pathological answer, and a timer
signal cannot stop sympy stuck inside C code (nor run off the main thread). `MathVerifier`
therefore runs it in child processes (`urlvr.rewards._math_worker`, up to `workers` of them, so
independent comparisons run in parallel). A comparison has `timeout_s` seconds, counted from the
moment a ready worker receives it: the worker's own timer stops it, and a reply later than that
(plus `REPLY_GRACE_S`) kills and restarts the child. Starting a worker (importing math-verify,
~1 s of CPU; a restart after a kill) and waiting for a free one are never billed to a comparison
(a loaded host made right answers time out when they were); a worker that does not start within
`STARTUP_TIMEOUT_S` is an error, not a verdict. Answers longer than `max_answer_chars` are
compared as strings only.

A comparison that ran out of time has no verdict and says so: `compare` returns
(None, timed_out=True), distinct from a failed comparison (None, False) and from "different"
(False). A `BudgetClock` bounds many comparisons together (a step's `VerificationBudget`); it
stops while a worker starts.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import math
import os
import queue
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

from urlvr.rewards._math_worker import PARENT_VARIABLE

STARTUP_TIMEOUT_S = 60.0  # per worker start; longer means math-verify is broken (or the host hopelessly loaded)
REPLY_GRACE_S = 1.0  # past a comparison's own timeout, for the worker's "timed out" reply to arrive
DEFAULT_TIMEOUT_S = 5.0  # per comparison
DEFAULT_WORKERS = 4  # child processes (each holds sympy: ~150 MB)
# the worker's file run on its own, not `-m urlvr.rewards._math_worker`: that would import the urlvr
# package first (torch and every built-in part, seconds and hundreds of MB per worker, and past the
# worker's own address-space limit); the file imports nothing of urlvr
WORKER_COMMAND = (sys.executable, "-c", "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')",
                  str(Path(__file__).with_name("_math_worker.py")))


class BudgetClock:
    """Seconds left of a budget: wall time since it opened, less the time during which some
    comparison waited for a worker process to start (overlapping waits count once)."""

    def __init__(self, budget_s: float) -> None:
        if budget_s <= 0:
            raise ValueError(f"budget_s must be > 0, got {budget_s}")
        self.budget_s = budget_s
        self._opened = time.monotonic()
        self._paused_s = 0.0
        self._pausers = 0
        self._paused_at = 0.0
        self._lock = threading.Lock()

    def left(self) -> float:
        with self._lock:
            now = self._paused_at if self._pausers else time.monotonic()  # a stopped clock reads its stop time
            return self.budget_s - (now - self._opened - self._paused_s)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the clock while the body runs (a worker starting)."""
        with self._lock:
            if self._pausers == 0:
                self._paused_at = time.monotonic()
            self._pausers += 1
        try:
            yield
        finally:
            with self._lock:
                self._pausers -= 1
                if self._pausers == 0:
                    self._paused_s += time.monotonic() - self._paused_at


class _Worker:
    """One math-verify child process; restarted in the background when it has to be killed."""

    def __init__(self, command: Sequence[str]) -> None:
        self.command = list(command)
        self.process: subprocess.Popen | None = None
        self.ready = False
        self.spawned_at = 0.0

    def start(self) -> None:
        """Return once the child is ready (spawning it if need be): up to STARTUP_TIMEOUT_S
        after it was spawned, else RuntimeError -- a worker that cannot start is a broken setup."""
        if self.process is None or self.process.poll() is not None:
            self.spawn()
        if self.ready:
            return
        left = STARTUP_TIMEOUT_S - (time.monotonic() - self.spawned_at)
        ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, left))
        self.ready = bool(ready) and bool(self.process.stdout.readline())
        if not self.ready:
            why = "exited" if ready or self.process.poll() is not None else f"was not ready within {STARTUP_TIMEOUT_S:.0f} s"
            self.kill()
            raise RuntimeError(f"the math-verify worker {why} on start-up (is math-verify importable? "
                               f"try `{' '.join(self.command)}`)")

    def ask(self, request: dict, wait_s: float) -> tuple[dict | None, bool]:
        """(reply, timed_out) from a ready worker: the reply, or None -- with timed_out=True when
        none came within `wait_s` (the child is killed and restarted), False when the child died."""
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            self.restart()
            return None, False
        ready, _, _ = select.select([self.process.stdout], [], [], None if math.isinf(wait_s) else max(0.0, wait_s))
        line = self.process.stdout.readline() if ready else None
        if not line:  # too slow (stuck where its own timer cannot reach) or dead: a fresh one warms up meanwhile
            self.restart()
            return None, line is None
        reply = json.loads(line)
        return reply, bool(reply.get("timeout"))

    def spawn(self) -> None:
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
            env={**os.environ, PARENT_VARIABLE: str(os.getpid())},  # the worker ends when this process does
        )
        self.ready, self.spawned_at = False, time.monotonic()

    def restart(self) -> None:
        self.kill()
        self.spawn()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process, self.ready = None, False


class MathVerifier:
    """Symbolic answer equivalence in supervised child processes.

    `compare(a, b)` returns (verdict, timed_out): (True/False, False) for a verdict, (None, True)
    when the comparison ran out of time, (None, False) when math-verify failed on it. Thread-safe:
    up to `workers` comparisons run at once, each in its own child; children start on first use
    and are restarted after a kill. `command` runs one child (default `WORKER_COMMAND`; tests pass
    a stand-in worker).
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, max_answer_chars: int = 1000,
                 workers: int = DEFAULT_WORKERS, command: Sequence[str] | None = None) -> None:
        if importlib.util.find_spec("math_verify") is None:
            raise ImportError("math-verify is not installed: pip install 'math-verify==0.9.0'")
        if workers < 1:
            raise ValueError(f"math-verify needs at least one worker, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        self.timeout_s = timeout_s
        self.max_answer_chars = max_answer_chars
        self.workers = workers
        self.timeouts = 0  # comparisons that ran out of time (own timeout or a budget's clock), over the lifetime
        self._all = [_Worker(WORKER_COMMAND if command is None else command) for _ in range(workers)]
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()  # LIFO: reuse a warm child first
        for worker in self._all:
            self._idle.put(worker)
        self._count_lock = threading.Lock()

    def equivalent(self, a: str, b: str, clock: BudgetClock | None = None) -> bool | None:
        """a ≡ b? None when unverified (`compare` says whether time ran out)."""
        return self.compare(a, b, clock)[0]

    def compare(self, a: str, b: str, clock: BudgetClock | None = None) -> tuple[bool | None, bool]:
        """(verdict, timed_out): the verdict (None when unverified), and whether time ran out -- the
        comparison's own `timeout_s`, or the `clock` of its budget while waiting for a free worker
        or for the reply. Waiting for a worker to start is billed to neither."""
        if a == b:
            return True, False
        if max(len(a), len(b)) > self.max_answer_chars:
            return False, False
        worker = self._free_worker(clock)
        if worker is None:
            return self._timed_out()
        try:
            with clock.paused() if clock is not None else nullcontext():
                worker.start()
            allowed = min(self.timeout_s, math.inf if clock is None else clock.left())
            if allowed <= 0:
                return self._timed_out()
            reply, timed_out = worker.ask({"op": "equal", "gold": a, "pred": b, "timeout": allowed},
                                          allowed + REPLY_GRACE_S)
        finally:
            self._idle.put(worker)
        if timed_out:
            return self._timed_out()
        return (bool(reply["result"]) if reply is not None and reply.get("ok") else None), False

    def _free_worker(self, clock: BudgetClock | None) -> _Worker | None:
        """The next idle worker, or None when the budget ran out first (its clock may stop meanwhile)."""
        while True:
            left = math.inf if clock is None else clock.left()
            if left <= 0:
                return None
            try:
                return self._idle.get(timeout=None if math.isinf(left) else left)
            except queue.Empty:
                continue

    def _timed_out(self) -> tuple[None, bool]:
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
