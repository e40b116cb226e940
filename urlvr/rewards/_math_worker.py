"""The math-verify worker: `python -m urlvr.rewards._math_worker`, one JSON request per line.

It runs in its own process because math-verify's timeouts use `signal.alarm`, which only works
on a main thread (a trainer may call rewards from elsewhere) and cannot interrupt sympy stuck in
C code. Here it *is* the main thread, so math-verify's own per-call timeouts apply, and the
parent adds a hard deadline on top: it kills and restarts this process when a reply is late.

Request:  {"op": "equal", "gold": "...", "pred": "...", "timeout": 5}
Reply:    {"ok": true, "result": true} or {"ok": false, "error": "..."}
"""

from __future__ import annotations

import json
import resource
import sys
from functools import lru_cache

MEMORY_LIMIT_BYTES = 4 * 1024**3  # a runaway sympy expression raises MemoryError, not OOM-kills the host


@lru_cache(maxsize=4096)
def _parsed(answer: str, timeout: int):
    from math_verify import parse

    # wrapping in \boxed{} lets math-verify read LaTeX (\frac{1}{2}) and plain text (1/2, 0.5) alike
    return parse(f"\\boxed{{{answer}}}", parsing_timeout=timeout)


def equal(gold: str, pred: str, timeout: int) -> bool:
    from math_verify import verify

    if gold == pred:
        return True
    parsed_gold, parsed_pred = _parsed(gold, timeout), _parsed(pred, timeout)
    if not parsed_gold or not parsed_pred:
        return False
    return bool(verify(parsed_gold, parsed_pred, timeout_seconds=timeout))


def main() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ValueError, OSError):  # not permitted here: the parent's deadline still applies
        pass
    import math_verify  # noqa: F401  (import before the first request, so its time is not billed to it)

    sys.stdout.write(json.dumps({"ok": True, "result": "ready"}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
            if request["op"] != "equal":
                raise ValueError(f"unknown op {request['op']!r}")
            reply = {"ok": True, "result": equal(request["gold"], request["pred"], int(request["timeout"]))}
        except Exception as err:  # noqa: BLE001 -- any failure is a "not verified" for the parent
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
