"""The math-verify worker: this file run as a script (`math_workers.WORKER_COMMAND`; it imports
nothing of urlvr, so the package is not loaded), one JSON request per line.

It runs in its own process because a comparison must be stoppable: a timer signal only works on
a main thread (a trainer may call rewards from elsewhere) and cannot interrupt sympy stuck in C
code. Here it *is* the main thread, so this worker's own timer (`timeout` seconds from reading
the request) stops a comparison still running Python code, and the parent kills and restarts the
process when even that reply is late.

math-verify's own timeouts are switched off: they return "not equivalent" (False, or no parse)
when they fire, which would make a comparison that ran out of time look like a wrong answer. The
worker's timer instead answers `{"ok": false, "timeout": true}`.

Start-up -- importing math-verify and one warm-up comparison (the first one loads sympy's
parsers, ~0.2 s) -- happens before the worker prints its ready line, so no request pays for it.

Request:  {"op": "equal", "gold": "...", "pred": "...", "timeout": 5.0}
Reply:    {"ok": true, "result": true}, {"ok": false, "timeout": true} or {"ok": false, "error": "..."}
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from functools import lru_cache

MEMORY_LIMIT_BYTES = 4 * 1024**3  # a runaway sympy expression raises MemoryError, not OOM-kills the host
PARENT_VARIABLE = "URLVR_MATH_WORKER_PARENT"  # the pid of the process that started this worker
ORPHAN_POLL_S = 0.5
READY = {"ok": True, "result": "ready"}


class OutOfTime(BaseException):
    """The request's time ran out. A BaseException, so math-verify's and sympy's `except
    Exception` handlers cannot turn it into a verdict."""


@lru_cache(maxsize=4096)
def _parsed(answer: str):
    from math_verify import parse  # heavy (seconds, sympy), loaded on demand: the parent process imports this module too

    # wrapping in \boxed{} lets math-verify read LaTeX (\frac{1}{2}) and plain text (1/2, 0.5) alike;
    # parsing_timeout=None: this worker's timer bounds the request instead (see the module docstring)
    return parse(f"\\boxed{{{answer}}}", parsing_timeout=None)


def equal(gold: str, pred: str) -> bool:
    from math_verify import verify  # (the same)

    if gold == pred:
        return True
    parsed_gold, parsed_pred = _parsed(gold), _parsed(pred)
    if not parsed_gold or not parsed_pred:
        return False
    return bool(verify(parsed_gold, parsed_pred, timeout_seconds=None))


def start() -> None:
    """Load math-verify and warm it up (before the ready line: start-up is never billed to a request)."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" is by design here
    equal("1/2", "0.5")


def answer(request: dict, compare: Callable[[str, str], bool]) -> dict:
    """The reply to one request; `compare` runs under a timer of `request["timeout"]` seconds."""
    fired = False

    def on_alarm(signum, frame):
        nonlocal fired
        fired = True
        raise OutOfTime

    try:
        if request.get("op") != "equal":
            raise ValueError(f"unknown op {request.get('op')!r}")
        gold, pred, seconds = str(request["gold"]), str(request["pred"]), float(request["timeout"])
        previous = signal.signal(signal.SIGALRM, on_alarm)
        try:
            if math.isfinite(seconds):  # an infinite timeout (a recipe's .inf): no timer at all
                signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
            result = compare(gold, pred)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    except OutOfTime:
        return {"ok": False, "timeout": True}
    except Exception as err:  # noqa: BLE001 -- any failure is a "not verified" for the parent
        return {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
    if fired:  # some library caught OutOfTime anyway: its result is not a verdict
        return {"ok": False, "timeout": True}
    return {"ok": True, "result": bool(result)}


def exit_when_orphaned(parent_pid: int) -> None:
    """End this worker within a second of its parent's death, whatever it is doing. An idle worker
    ends anyway (its stdin closes), but one busy with a comparison would not: a comparison stuck
    where the timer cannot reach, or one without a time limit, kept an orphan (~150 MB, a core if
    it spins) alive after its trainer was killed (kill -9, SIGTERM, an OOM kill), with no parent
    left to enforce the deadline. (A comparison inside C code that holds the interpreter lock
    delays this thread until it lets go.) `urlvr.lifeline`'s watch, written here again: this file
    imports nothing of urlvr."""
    while os.getppid() == parent_pid:
        time.sleep(ORPHAN_POLL_S)
    os._exit(1)


def serve(compare: Callable[[str, str], bool] = equal, warm_up: Callable[[], None] = start) -> None:
    """Warm up, print the ready line, then answer requests from stdin until it closes (or, when
    started with PARENT_VARIABLE, until that parent is gone).
    (Tests serve a stand-in `compare` / `warm_up` through this same loop.)"""
    if os.environ.get(PARENT_VARIABLE, "").isdigit():
        threading.Thread(target=exit_when_orphaned, args=(int(os.environ[PARENT_VARIABLE]),), daemon=True).start()
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ValueError, OSError):  # not permitted here: the parent's deadline still applies
        pass
    warm_up()
    sys.stdout.write(json.dumps(READY) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
        except ValueError as err:
            reply = {"ok": False, "error": f"bad request: {err}"[:500]}
        else:
            reply = answer(request, compare)
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
