"""A stand-in math-verify worker for the verifier's timing tests, run as a script:

    python tests/fake_math_worker.py START_DELAY_S LOG_PATH

It speaks the real protocol (`urlvr.rewards._math_worker.serve`, the real timer included) but
starts and compares under the test's control: it sleeps START_DELAY_S before its ready line (a
slow start, as when importing sympy on a loaded host) and compares answers as exact fractions
("1/2" = "0.5"), except for these predictions:
    STUCK  never returns and blocks the worker's timer (sympy stuck in C code): only a kill ends it;
    SLOW   runs Python code until the worker's own timer stops it;
    BAD    raises (math-verify failing on an answer).
Each request is appended to LOG_PATH as a line "gold|pred", so a test can count what was asked.
"""

from __future__ import annotations

import signal
import sys
import time
from fractions import Fraction

from urlvr.rewards._math_worker import serve


def compare(gold: str, pred: str) -> bool:
    with open(sys.argv[2], "a") as log:
        log.write(f"{gold}|{pred}\n")
    if pred == "STUCK":
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        while True:
            time.sleep(3600)
    if pred == "SLOW":
        while True:
            pass
    if pred == "BAD":
        raise ValueError("cannot parse")
    return Fraction(gold) == Fraction(pred)


if __name__ == "__main__":
    serve(compare, warm_up=lambda: time.sleep(float(sys.argv[1])))
