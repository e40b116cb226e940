"""A process that ends with the ones that started it: block until a watched ancestor is gone.

Used by a launched rank (`urlvr.dist`: its launcher) and by a generation server urlvr started
(`urlvr.rollout.server`: its trainer). A process's parent changes only when that parent dies (the
child is re-parented to init or a subreaper), so "my ancestors are no longer these pids" is the
death of one of them, read from the process table without signals or pipes. (The math-verify
worker keeps its own two-line copy: that file imports nothing of urlvr, by design.)
"""

from __future__ import annotations

import os
import time

POLL_S = 0.5  # a watcher notices a death within about this long


def ancestors(depth: int) -> list[int | None]:
    """This process's parent, its parent, ... (`depth` of them; None where /proc cannot say,
    e.g. not on Linux)."""
    chain: list[int | None] = [os.getppid()]
    while len(chain) < depth:
        try:
            with open(f"/proc/{chain[-1]}/stat") as stat:
                chain.append(int(stat.read().rsplit(")", 1)[1].split()[1]))  # the field after the state
        except (OSError, ValueError, IndexError, TypeError):
            chain.append(None)
    return chain


def wait_until_gone(watched: list[int | None], poll_s: float = POLL_S) -> int | None:
    """Block until this process's ancestors (parent first) are no longer `watched`; return the pid
    that went away. `watched` is usually `ancestors(n)` read at start-up, or `[pid]` for a parent
    given from outside (returns at once when that pid is not the parent now)."""
    while (now := ancestors(len(watched))) == watched:
        time.sleep(poll_s)
    return next(was for pid, was in zip(now, watched) if pid != was)
