"""External rewards: the safe Countdown evaluator (adversarial inputs within limits), math-verify
with its own timeouts, the new extractors, and composition (gates, on_error, aliases)."""

import time
from fractions import Fraction

import pytest
import torch

import urlvr.builtins  # noqa: F401  (the built-in rewards, e.g. `format` used as a gate)
from urlvr.rewards.base import LabelAccessError, RewardContext, RewardOutput, reward
from urlvr.rewards.compose import RewardError, RewardTermSpec, score_batch
from urlvr.rewards.countdown import UnsafeExpression, check_countdown, countdown, safe_evaluate
from urlvr.rewards.extractors import extract_boxed, extract_countdown_answer, make_extractor
from urlvr.rollout.base import Group, PromptInput, Sample


def group_of(texts, prompt_id="p0", extractor=extract_boxed, metadata=None, label=None):
    samples = tuple(Sample((1,), (0.0,), t, "eos") for t in texts)
    group = Group(PromptInput(prompt_id, "q", (5,)), samples)
    ctx = RewardContext(answers=tuple(extractor(t) for t in texts), response_mask=torch.ones(len(texts), 1),
                        token_stats={}, extract_answer=extractor, metadata=metadata or {}, _label=label)
    return group, ctx


# --------------------------------------------------------------------------- countdown
@pytest.mark.parametrize("expression, value, literals", [
    ("(3+5)*2", 16, [3, 5, 2]), ("6/4*2", 3, [6, 4, 2]), ("-3+10", 7, [3, 10]), ("100-(25-5)/4", 95, [100, 25, 5, 4]),
])
def test_safe_evaluate_is_exact(expression, value, literals):
    assert safe_evaluate(expression) == (Fraction(value), literals)


ADVERSARIAL = [
    "9**9**9**9", "9" * 1_000_000, "(" * 100_000 + "1" + ")" * 100_000, "(" * 40 + "1" + ")" * 40,
    "__import__('os').system('echo pwned')", "1/0", "(1-1)**-1", "2**10000", "1+" * 200 + "1", "[1,2][0]",
    "lambda: 1", "1e308*10", "0x10", "1_000", "٣+٤", "True+1", "1;2", "\x00", "",
]


@pytest.mark.parametrize("allow_power", [False, True])
def test_adversarial_expressions_are_refused_quickly(allow_power):
    for text in ADVERSARIAL:
        start = time.process_time()  # CPU seconds: other processes on a loaded host do not count
        with pytest.raises(UnsafeExpression):
            safe_evaluate(text, allow_power=allow_power)
        assert time.process_time() - start < 0.05, text[:40]


def test_power_is_bounded_when_allowed():
    assert safe_evaluate("2**10", allow_power=True)[0] == 1024
    with pytest.raises(UnsafeExpression):
        safe_evaluate("2**10")  # not allowed by default
    with pytest.raises(UnsafeExpression, match="bits"):
        safe_evaluate("99999999999**16", allow_power=True)  # 37 bits x 16 > 256


@pytest.mark.parametrize("answer, ok", [
    ("(3+5)*2", True), ("2*(5+3)", True), ("(3+5)*2=16", True), ("(3\\times5)+2-1", False),
    ("(3+5)*2=17", False), ("3+5+2", False), ("(3+5)*2*1", False), ("(3+5)*2+0", False), ("16", False),
    ("(3+5)\\times2", True), ("{3+5}\\cdot2", True), ("(3+5)*2 = 16 = 16", False), ("9**9**9**9", False),
])
def test_check_countdown(answer, ok):
    assert check_countdown(answer, [3, 5, 2], 16) is ok


def test_each_number_exactly_once_vs_at_most_once():
    assert not check_countdown("3*5+1", [3, 5, 2, 1], 16)
    assert check_countdown("3*5+1", [3, 5, 2, 1], 16, use_all=False)
    assert not check_countdown("3*5+1+1-1", [3, 5, 1], 16, use_all=False)  # 1 used three times


def test_countdown_reward_scores_groups():
    meta = {"numbers": [3, 5, 2], "target": 16}
    texts = ["\\boxed{(3+5)*2}", "\\boxed{3+5+2}", "no answer", "\\boxed{9**9**9**9}", "\\boxed{__import__('os')}"]
    group, ctx = group_of(texts, metadata=meta)
    out = countdown(group, ctx)
    assert out.scores == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert countdown(group, ctx, format_score=0.1).scores == [1.0, 0.1, 0.0, 0.1, 0.1]


def test_countdown_reads_tinyzero_columns_and_answer_tags():
    meta = {"nums": "[44, 19, 35]", "target": 98}
    group, ctx = group_of(["<answer> 44 + 19 + 35 </answer>", "<answer>44+19</answer>"],
                          extractor=extract_countdown_answer, metadata=meta)
    assert countdown(group, ctx, numbers_field="nums").scores == [1.0, 0.0]
    with pytest.raises(ValueError, match="numbers_field"):
        countdown(group, ctx)  # no "numbers" column: a configuration error, not a silent 0


# --------------------------------------------------------------------------- extractors
def test_countdown_answer_extractor():
    assert extract_countdown_answer("<answer>1</answer> then <answer> (1 + 2) * 3 </answer>") == "(1+2)*3"
    assert extract_countdown_answer("<answer>a<answer>b</answer>") == "b"  # the tag nearest the last close
    assert extract_countdown_answer("<answer>a</answer> and <answer>b") == "a"  # the last tag was cut off
    assert extract_countdown_answer("<answer>1 2</answer>") == "1 2"  # not the number 12
    assert extract_countdown_answer("<answer>  </answer>") is None
    assert extract_countdown_answer("no tags") is None


def test_regex_extractor_and_its_load_time_checks():
    extract = make_extractor("regex", {"pattern": r"Answer:\s*(?P<a>\S+)", "group": "a"})
    assert extract("Answer: 1\nAnswer: 07.") == "7"
    first = make_extractor("regex", {"pattern": r"Answer: (\d+)", "occurrence": "first"})
    assert first("Answer: 1 Answer: 2") == "1" and first("nothing") is None
    for bad, message in [({}, "needs a `pattern`"), ({"pattern": "("}, "does not compile"),
                         ({"pattern": "a(b)", "group": 2}, "has 1 groups"), ({"pattern": "x", "flags": 1}, "no argument")]:
        with pytest.raises(ValueError, match=message):
            make_extractor("regex", bad)


# --------------------------------------------------------------------------- math-verify
def test_math_verify_reward_uses_symbolic_equivalence():
    pytest.importorskip("math_verify")
    from urlvr.rewards.math_verify import math_verify_reward

    group, ctx = group_of(["\\boxed{0.5}", "\\boxed{\\frac{2}{4}}", "\\boxed{1/3}", "none"], label="\\frac{1}{2}")
    out = math_verify_reward(group, ctx.with_label_access(True), timeout_s=60.0)  # a limit that never races
    assert out.scores == [1.0, 1.0, 0.0, 0.0] and out.timeouts == 0
    with pytest.raises(LabelAccessError):
        math_verify_reward(group, ctx)


# issue 10, item 11: a step's comparisons share one time budget, a verdict cache and parallel workers;
# issue 19, item 3: timing tests with a stand-in worker are in test_verification_timeouts.py
TOWERS = ["10^{10^{10^{10}}}"] + [f"{k}^{{{k}^{{{k}^{{{k}}}}}}}" for k in (7, 8, 9, 11, 12)]  # none ever finishes


def test_math_verify_timeout_is_enforced_off_the_main_thread():
    """Off the main thread (where math-verify's own signal-based timeout refuses to run), a
    pathological comparison is stopped by its budget and the verifier still answers afterwards.
    No race: the tower never finishes, and the comparison that must succeed has a minute."""
    pytest.importorskip("math_verify")
    import threading

    from urlvr.rewards.math_verify import BudgetClock, MathVerifier

    verifier = MathVerifier(timeout_s=60.0, workers=1)
    results = {}

    def work():
        results["slow"] = verifier.compare("1", TOWERS[0], clock=BudgetClock(1.0))
        results["after"] = verifier.compare("1/2", "0.5")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=300)
    verifier.close()
    assert results["slow"] == (None, True)  # out of time: no verdict, and it says so
    assert results["after"] == (True, False)
    assert verifier.timeouts == 1


def test_math_verify_reward_bounds_a_pathological_group_by_its_budget():
    pytest.importorskip("math_verify")
    from urlvr.rewards.math_verify import math_verify_reward

    group, ctx = group_of([f"\\boxed{{{t}}}" for t in TOWERS] + ["\\boxed{8000}", "none"], label="8,000")
    out = math_verify_reward(group, ctx.with_label_access(True), timeout_s=5.0, budget_s=2.0, workers=2)
    assert out.scores == [0.0] * len(TOWERS) + [1.0, 0.0]  # `8000` matches the label `8,000` without a worker
    assert out.diagnostics["cut_short"] == [1.0] * len(TOWERS) + [0.0, 0.0]
    assert out.diagnostics["failed"] == [1.0] * len(TOWERS) + [0.0, 0.0]
    assert out.timeouts == len(TOWERS)  # counted: scored 0 like a wrong answer, but not silently


def test_semantic_cluster_step_is_bounded_by_the_budget_and_logs_cut_short():
    pytest.importorskip("math_verify")
    groups_and_contexts = [group_of([f"\\boxed{{{t}}}" for t in TOWERS], "a"),
                           group_of([f"\\boxed{{{t}}}" for t in reversed(TOWERS)], "b")]
    groups, contexts = [g for g, _ in groups_and_contexts], [c for _, c in groups_and_contexts]
    term = RewardTermSpec("semantic_cluster", 1.0, {"timeout_s": 5.0, "budget_s": 2.0, "workers": 2})
    out = score_batch(groups, contexts, [term], oracle=None)  # 2 x 15 comparisons, one budget for the step
    assert out.per_term["semantic_cluster"].flatten().tolist() == pytest.approx([1 / 6] * 12)  # unverified = different
    cut = out.diagnostics["semantic_cluster/cut_short"]  # logged as reward/semantic_cluster/cut_short_mean
    assert (cut > 0).all() and (cut <= 15).all()
    assert out.timeouts == {"semantic_cluster": int(cut[0, 0] + cut[1, 0])}  # reward/semantic_cluster_timeouts


def test_verification_knobs_are_recipe_kwargs():
    from urlvr.rewards.base import check_reward_kwargs

    for name in ("semantic_cluster", "math_verify"):
        check_reward_kwargs(name, {"timeout_s": 2.0, "budget_s": 10.0, "workers": 2})
        for bad in ({"budget_s": "soon"}, {"budget_s": 0}, {"workers": 0}):
            with pytest.raises(ValueError, match=next(iter(bad))):
                check_reward_kwargs(name, bad)


# --------------------------------------------------------------------------- composition
@reward("test_always_one")
def _always_one(group, ctx):
    """1 for every sample."""
    return [1.0] * group.size


@reward("test_fails_on_b")
def _fails_on_b(group, ctx):
    """Raises on the prompt named 'b'."""
    if group.prompt.prompt_id == "b":
        err = ValueError("cannot score this")
        err.sample_index = 1
        raise err
    return RewardOutput(scores=[0.5] * group.size, diagnostics={"seen": [1.0] * group.size})


def two_groups():
    a = group_of(["\\boxed{1}", "x"], "a")
    b = group_of(["\\boxed{2}", "the bad one"], "b")
    return [a[0], b[0]], [a[1], b[1]]


def test_gate_zeroes_answerless_samples():
    groups, contexts = two_groups()
    out = score_batch(groups, contexts, [RewardTermSpec("test_always_one", 2.0, {}, gate="format")], oracle=None)
    assert out.total.tolist() == [[2.0, 0.0], [2.0, 0.0]]


def test_a_failing_reward_names_reward_prompt_and_sample():
    groups, contexts = two_groups()
    with pytest.raises(RewardError, match=r"'test_fails_on_b' failed on prompt 'b', sample 1 \('the bad one'\)"):
        score_batch(groups, contexts, [RewardTermSpec("test_fails_on_b", 1.0, {})], oracle=None)


def test_on_error_zero_scores_the_group_zero_and_counts_it():
    groups, contexts = two_groups()
    terms = [RewardTermSpec("test_fails_on_b", 1.0, {}, on_error="zero"), RewardTermSpec("format", 1.0, {}, alias="fmt")]
    out = score_batch(groups, contexts, terms, oracle=None)
    assert out.per_term["test_fails_on_b"].tolist() == [[0.5, 0.5], [0.0, 0.0]]
    assert out.errors == {"test_fails_on_b": 0.5}
    assert out.per_term["fmt"].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    seen = out.diagnostics["test_fails_on_b/seen"]
    assert seen[0].tolist() == [1.0, 1.0] and torch.isnan(seen[1]).all()


def test_on_error_zero_never_hides_a_label_leak():
    import reward_plugins  # noqa: F401  (registers test_peeks_at_label)

    groups, contexts = two_groups()
    contexts = [ctx.__class__(**{**ctx.__dict__, "_label": "1"}) for ctx in contexts]
    with pytest.raises(LabelAccessError):
        score_batch(groups, contexts, [RewardTermSpec("test_peeks_at_label", 1.0, {}, on_error="zero")], oracle=None)
