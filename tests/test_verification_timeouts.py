"""Verification under time limits (issue 19, item 3): start-up and queueing are never billed to a
comparison, a comparison that ran out of time is told apart from a wrong answer and counted
(`reward/<term>_timeouts`, `eval/judge_timeouts`), and none of these tests races the clock.

The slow cases are controlled, not timed: `fake_math_worker.py` answers "STUCK" never (only a kill
ends it) and "SLOW" only when the worker's own timer stops it, and starts as slowly as asked;
sleeps only ever make a slow case slower. What must succeed has a generous timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import process_alive
import urlvr.builtins  # noqa: F401  (the built-in rewards)
from urlvr.rewards import _math_worker
from urlvr.rewards.base import RewardContext
from urlvr.rewards.compose import RewardTermSpec, score_batch
from urlvr.rollout.base import Group, PromptInput, Sample

pytest.importorskip("math_verify")  # MathVerifier refuses to start without it, even with a stand-in worker

from urlvr.rewards import math_verify as mv  # noqa: E402
from urlvr.rewards import math_workers  # noqa: E402

FAKE = Path(__file__).with_name("fake_math_worker.py")
GENEROUS_S = 60.0  # a comparison that must succeed: a minute for a trivial reply


def fake_command(log: Path, start_delay_s: float = 0.0) -> list[str]:
    return [sys.executable, str(FAKE), str(start_delay_s), str(log)]


def asked(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture
def fake_verifiers(tmp_path, monkeypatch):
    """Every verifier the rewards build (`shared_verifier`) runs the stand-in worker, logging to tmp_path."""
    made: list[mv.MathVerifier] = []
    monkeypatch.setattr(math_workers, "WORKER_COMMAND", tuple(fake_command(tmp_path / "asked.log")))
    monkeypatch.setattr(math_workers, "_SHARED", {})
    original = mv.MathVerifier.__init__

    def tracked(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(mv.MathVerifier, "__init__", tracked)
    yield tmp_path / "asked.log"
    for verifier in made:
        verifier.close()


# --------------------------------------------------------------------------- the verifier
@pytest.mark.timeout(300)
def test_a_slow_worker_start_is_not_billed_to_the_comparison(tmp_path):
    """The issue's failure: a worker (re)starting for longer than `timeout_s` made a right answer
    time out. Here every start takes longer than the comparison's whole timeout."""
    log = tmp_path / "asked.log"
    verifier = mv.MathVerifier(timeout_s=3.0, workers=1, command=fake_command(log, start_delay_s=3.5))
    try:
        assert verifier.compare("1/2", "0.5") == (True, False)  # first start: 3.5 s > 3 s, still a verdict
        assert verifier.compare("1/2", "STUCK") == (None, True)  # killed; its restart takes 3.5 s again
        assert verifier.compare("1/2", "0.5") == (True, False)  # the case: right after a restart
        assert verifier.timeouts == 1
    finally:
        verifier.close()


@pytest.mark.timeout(300)
def test_out_of_time_is_told_apart_from_wrong_and_from_failed(tmp_path):
    log = tmp_path / "asked.log"
    verifier = mv.MathVerifier(timeout_s=1.0, workers=1, command=fake_command(log))
    try:
        verifier.compare("1", "1.0")
        worker_pid = verifier._all[0].process.pid
        assert verifier.compare("1/2", "1/3") == (False, False)  # wrong
        assert verifier.compare("1/2", "BAD") == (None, False)  # failed: no verdict, not for lack of time
        assert verifier.compare("1/2", "SLOW") == (None, True)  # stopped by the worker's own timer ...
        assert verifier._all[0].process.pid == worker_pid  # ... which keeps the warm worker
        assert verifier.equivalent("1/2", "SLOW") is None and verifier.timeouts == 2
    finally:
        verifier.close()


@pytest.mark.timeout(300)
def test_a_step_budget_cuts_short_counts_and_caches(tmp_path):
    log = tmp_path / "asked.log"
    verifier = mv.MathVerifier(timeout_s=GENEROUS_S, workers=1, command=fake_command(log))
    try:
        budget = mv.VerificationBudget(verifier, budget_s=1.0)
        assert budget.verdicts([("1", "STUCK")]) == [None]  # its own timeout is a minute: the budget stopped it
        assert budget.cut_short(("1", "STUCK")) and budget.cut_short_count == 1
        assert budget.verdicts([("1", "STUCK")] * 3 + [("1", "1.0")]) == [None] * 3 + [None]  # budget spent
        assert asked(log) == ["1|STUCK"]  # cached for the step: asked once; nothing asked once spent
        assert budget.cut_short_count == 2 and verifier.timeouts == 2
    finally:
        verifier.close()


def test_the_budget_clock_stops_while_a_worker_starts():
    clock = mv.BudgetClock(1000.0)
    with clock.paused():
        with clock.paused():  # overlapping starts count once
            stopped = clock.left()
        assert clock.left() == stopped  # still paused: not a tick of wall time is billed
    assert clock.left() <= stopped
    with pytest.raises(ValueError, match="budget_s"):
        mv.BudgetClock(0.0)


@pytest.mark.timeout(300)
def test_a_worker_that_cannot_start_is_an_error_not_a_verdict(tmp_path):
    verifier = mv.MathVerifier(timeout_s=1.0, workers=1, command=[sys.executable, "-c", "raise SystemExit(3)"])
    try:
        with pytest.raises(RuntimeError, match="math-verify worker exited on start-up"):
            verifier.compare("1/2", "0.5")
    finally:
        verifier.close()



@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
@pytest.mark.parametrize("pred", ["STUCK", "SLOW"])
@pytest.mark.timeout(300)
def test_a_busy_worker_ends_with_its_trainer(tmp_path, pred):
    """A trainer killed while a worker compares (STUCK: where no timer reaches; SLOW: without a
    time limit) leaves no worker behind. An idle one always ended (its stdin closes); a busy one
    lived on as an orphan, holding its memory (and a core, spinning) until the machine rebooted."""
    log = tmp_path / "asked.log"
    trainer = subprocess.Popen(
        [sys.executable, "-c", "import sys; from urlvr.rewards.math_workers import MathVerifier; "
         f"v = MathVerifier(timeout_s=float('inf'), workers=1, command={fake_command(log)!r}); "
         "v._all[0].start(); print(v._all[0].process.pid, flush=True); v.compare('1', sys.argv[1])", pred],
        stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(trainer.stdout.readline())
        while asked(log) != [f"1|{pred}"]:  # the worker is busy with the comparison
            assert trainer.poll() is None, "the stand-in trainer ended before its comparison started"
            time.sleep(0.1)
        trainer.kill()
        trainer.wait()
        for _ in range(1200):  # within a second or so; two minutes on a loaded host is still a pass
            if not process_alive(worker):
                break
            time.sleep(0.1)
        assert not process_alive(worker), f"the math-verify worker (pid {worker}) outlived its trainer"
    finally:
        trainer.kill()
        if worker is not None and process_alive(worker):
            os.kill(worker, signal.SIGKILL)


# --------------------------------------------------------------------------- the worker's own timer
def _forever(gold, pred):
    while True:
        pass


def _swallows(gold, pred):
    try:
        _forever(gold, pred)
    except BaseException:  # a library that catches everything: its result is no verdict either
        return False


@pytest.mark.parametrize("compare", [_forever, _swallows])
def test_the_worker_answers_timeout_never_a_verdict(compare):
    assert _math_worker.answer({"op": "equal", "gold": "1", "pred": "2", "timeout": 0.05}, compare) == {
        "ok": False, "timeout": True}
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # disarmed


def test_the_worker_answers_verdicts_and_errors():
    assert _math_worker.answer({"op": "equal", "gold": "1", "pred": "1", "timeout": GENEROUS_S},
                               lambda a, b: a == b) == {"ok": True, "result": True}
    assert _math_worker.answer({"op": "nope"}, lambda a, b: True)["error"].startswith("ValueError")


def test_math_verify_s_own_timeouts_are_off_in_the_worker(monkeypatch):
    """math-verify returns False when its own timer fires; the worker must never let it."""
    import math_verify

    seen = []
    monkeypatch.setattr(math_verify, "parse", lambda text, **kw: seen.append(kw) or [text])
    monkeypatch.setattr(math_verify, "verify", lambda a, b, **kw: seen.append(kw) or False)
    _math_worker._parsed.cache_clear()
    _math_worker.equal("x_unseen", "y_unseen")
    _math_worker._parsed.cache_clear()
    assert seen == [{"parsing_timeout": None}, {"parsing_timeout": None}, {"timeout_seconds": None}]


# --------------------------------------------------------------------------- rewards, composition, evaluation
def group_of(answers, prompt_id="p0", label=None):
    samples = tuple(Sample((1,) * (i + 1), (0.0,) * (i + 1), f"\\boxed{{{a}}}", "eos") for i, a in enumerate(answers))
    group = Group(PromptInput(prompt_id, "q", (5,)), samples)
    ctx = RewardContext.for_group(answers, torch.ones(len(answers), 1), extract_answer=lambda t: t, label=label)
    return group, ctx


@pytest.mark.timeout(300)
def test_timeouts_are_counted_per_term_and_for_the_oracle(fake_verifiers):
    groups, contexts = zip(group_of(["0.5", "SLOW", "1/3", "SLOW"], "a", label="1/2"),
                           group_of(["2", "2.0", "SLOW", "3"], "b", label="2"))
    kwargs = {"timeout_s": 1.0, "budget_s": GENEROUS_S, "workers": 1}
    terms = [RewardTermSpec("math_verify", 1.0, kwargs),
             RewardTermSpec("semantic_cluster", 0.0, {**kwargs, "equivalence": "exact"}, alias="exact_clusters"),
             RewardTermSpec("semantic_cluster", 0.0, kwargs, alias="clusters")]
    out = score_batch(list(groups), list(contexts), terms, oracle="math_verify")
    assert out.per_term["math_verify"][0].tolist() == [1.0, 0.0, 0.0, 0.0]  # out of time scores 0 ...
    assert out.timeouts["math_verify"] == 3  # ... and is counted: 2 samples of a, 1 of b (one comparison in a)
    assert out.diagnostics["math_verify/cut_short"][0].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert "exact_clusters" not in out.timeouts  # string equality cannot run out of time: no key
    assert out.timeouts["clusters"] == 2  # (0.5, SLOW) in a (then SLOW is a representative), (2, SLOW) in b
    assert out.timeouts["oracle"] == 3  # the oracle's, under reward/oracle_timeouts


def test_which_terms_log_timeouts_and_how():
    """A term logs `reward/<term>_timeouts` every step exactly when its verifications can run out
    of time with its kwargs (so every rank has the key, 0 included), summed over ranks."""
    import dataclasses

    from urlvr.rewards.base import REWARDS
    from urlvr.metrics.step import reward_term_metrics

    assert REWARDS.get("math_verify").is_timed({})
    assert REWARDS.get("semantic_cluster").is_timed({}) and not REWARDS.get("semantic_cluster").is_timed(
        {"equivalence": "exact"})
    assert REWARDS.get("unified").is_timed({"granularity": "answer", "equivalence": "math_verify"})
    assert not REWARDS.get("unified").is_timed({"granularity": "answer"})  # exact by default
    assert not REWARDS.get("ground_truth").is_timed({}) and not REWARDS.get("countdown").is_timed({})

    groups, contexts = zip(group_of(["1", "2"], "a"), group_of(["3", "3"], "b"))
    out = score_batch(list(groups), list(contexts), [RewardTermSpec("semantic_cluster", 1.0, {"equivalence": "exact"})],
                      oracle=None)
    assert out.timeouts == {}
    metrics, _ = reward_term_metrics(dataclasses.replace(out, timeouts={"clusters": 0, "oracle": 4}), 2)
    assert metrics["reward/clusters_timeouts"] == 0.0 and metrics["reward/oracle_timeouts"] == 4.0


@pytest.mark.timeout(300)
def test_a_timed_judge_counts_its_timeouts_in_evaluation(fake_verifiers):
    from urlvr.data.records import PromptRecord
    from urlvr.metrics.evaluation import judge_outcome, judge_samples

    group, _ = group_of(["0.5", "SLOW", "1/3"], "a")
    record = PromptRecord(prompt_id="a", prompt="q", label="1/2")
    answers = ["0.5", "SLOW", "1/3"]
    verdicts, timeouts = judge_outcome(group, record, answers, lambda t: t, "math_verify")
    assert verdicts == [True, False, False] and timeouts == 1  # counted incorrect, and counted as a timeout
    assert judge_samples(group, record, answers, lambda t: t, "math_verify") == [True, False, False]
    assert judge_outcome(group, record, answers, lambda t: t, None) == ([False, False, False], 0)


class CannedEngine:
    """Fixed responses per prompt: evaluation arithmetic is under test, not sampling."""

    def __init__(self, samples: dict[str, list[str]], greedy: dict[str, str]) -> None:
        self.samples, self.greedy = samples, greedy

    def generate(self, prompts, group_size, sampling):
        texts = {p.prompt_id: [self.greedy[p.prompt_id]] if sampling.greedy else self.samples[p.prompt_id][:group_size]
                 for p in prompts}
        return [Group(p, tuple(Sample((2,) * (j + 1), (0.0,) * (j + 1), t, "eos") for j, t in enumerate(texts[p.prompt_id])))
                for p in prompts]


@pytest.mark.timeout(300)
def test_evaluation_reports_judge_timeouts(fake_verifiers):
    from urlvr.data.records import PromptRecord
    from urlvr.metrics.evaluation import evaluate
    from urlvr.rollout.base import SamplingParams

    records = [PromptRecord("a", "q", "1/2"), PromptRecord("b", "q", "2")]
    prompts = [PromptInput(r.prompt_id, r.prompt, (1,)) for r in records]
    engine = CannedEngine({"a": ["0.5", "SLOW", "1/2"], "b": ["SLOW", "SLOW", "3"]}, {"a": "SLOW", "b": "2.0"})
    got = evaluate(engine, records, prompts, samples_per_prompt=3, sampling=SamplingParams(), extractor=lambda t: t,
                   greedy=True, judge="math_verify")
    assert got["eval/avg@3"] == pytest.approx((2 / 3 + 0) / 2)  # out of time: incorrect ...
    assert got["eval/judge_timeouts"] == 1 + 2 + 1  # ... and counted: a's SLOW, b's two, a's greedy
    assert got["eval/greedy_accuracy"] == pytest.approx(0.5)
    plain = evaluate(engine, records, prompts, samples_per_prompt=3, sampling=SamplingParams(), extractor=lambda t: t)
    assert "eval/judge_timeouts" not in plain  # label equality cannot run out of time


RANK_SCRIPT = """
import json, torch
from urlvr.rewards.compose import BatchRewards
from urlvr.metrics.step import reduce_over_ranks, reward_term_metrics
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
rewards = BatchRewards(total=torch.zeros(1, 2), per_term={}, oracle=None, diagnostics={},
                       timeouts={"math_verify": 1 + 2 * rank, "oracle": rank})  # rank 0: 1, 0; rank 1: 3, 1
local, counts = reward_term_metrics(rewards, 1)
print(json.dumps(reduce_over_ranks(local, counts, {}, 1.0)))
"""


@pytest.mark.timeout(600)
def test_timeouts_are_summed_over_ranks(tmp_path):
    """Two gloo ranks with different counts log the step's total, the same on both."""
    import json
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              text=True) for r in range(2)]
    outputs = [json.loads(p.communicate(timeout=540)[0].strip().splitlines()[-1]) for p in ranks]
    for out in outputs:
        assert out["reward/math_verify_timeouts"] == 4.0 and out["reward/oracle_timeouts"] == 1.0


def test_an_infinite_timeout_sets_no_timer():
    assert _math_worker.answer({"op": "equal", "gold": "1", "pred": "1", "timeout": float("inf")},
                               lambda a, b: a == b) == {"ok": True, "result": True}


@pytest.mark.timeout(300)
def test_a_verifier_without_a_time_limit_still_answers(tmp_path):
    verifier = mv.MathVerifier(timeout_s=float("inf"), workers=1, command=fake_command(tmp_path / "asked.log"))
    try:
        assert verifier.compare("1/2", "0.5") == (True, False)
    finally:
        verifier.close()
