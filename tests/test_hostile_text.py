"""Model text of any size or shape never raises in an extractor, the normaliser, a verdict parser
or the verifier: it gets an answer or None, in bounded time (DESIGN.md's invariant; issue 10).

The bound is generous (2 s per call on a shared CI core), not a performance test: it catches the
quadratic and exponential cases (a lazy regex rescanning from every unclosed tag, `int()` of an
unbounded digit string, a group separator chain retried from every group) that take minutes.
"""

from __future__ import annotations

import time

import pytest

import urlvr.builtins  # noqa: F401  (registers every built-in extractor)
from urlvr.data.adapters import latex_answer, numeric_answer
from urlvr.rewards.countdown import check_countdown
from urlvr.rewards.extractors import (
    EXTRACTORS,
    answer_char_span,
    last_boxed_content,
    make_extractor,
    normalize_answer,
)
from urlvr.rewards.self_verification import parse_verdict

BOUND_S = 2.0  # CPU seconds per call
MB = 1_000_000

HOSTILE = {
    "long_integer": "7" * 100_000,
    "boxed_long_integer": "\\boxed{" + "7" * 100_000 + "}",
    "boxed_4301_sevens": "\\boxed{" + "7" * 4301 + "}",  # the issue's input: int() refused it
    "grouped_long_integer": "\\boxed{7" + ",777" * 30_000 + "}",
    "separator_chain_broken_at_end": "1" + ",000" * 250_000 + ",0001",
    "unbalanced_open": "\\boxed{" + "{" * MB,
    "unbalanced_close": "}" * MB + "\\boxed{1",
    "nested_braces": "\\boxed{" + "{" * 200_000 + "1" + "}" * 200_000 + "}",
    "nested_text": "\\boxed{" + "\\text{" * 50_000 + "x" + "}" * 50_000 + "}",
    "nul_bytes": "\x00" * MB,
    "nul_in_box": "\\boxed{\x00" + "\x00" * 1000 + "}",
    "one_megabyte_prose": ("The answer is 8,000 apples. " * (MB // 28)),
    "many_boxes": "\\boxed" * (MB // 6),
    "many_space_boxes": "\\boxed " * (MB // 7),
    "unclosed_answer_tags": "<answer>" * (MB // 8),
    "unclosed_answer_tags_then_close": "<answer>" * (MB // 8) + "</answer>",
    "digits_and_spaces": "1 " * (MB // 2),
    "thin_space_groups": "1" + "\\,000" * 150_000,
    "backslashes": "\\" * MB,
    "dollars": "$" * MB,
    "unicode": "\u2009\u202f\u00a0٣𝟕" * (MB // 5),
}


def _text_callables():
    """Every registered extractor (the regex one with a simple pattern), the normaliser and the parsers."""
    names = [name for name in EXTRACTORS.names() if not name.startswith("test_")]  # not this file's raiser
    calls = {name: make_extractor(name, {"pattern": r"Answer:\s*(\S+)"} if name == "regex" else None) for name in names}
    calls |= {f"raw_{name}": EXTRACTORS.get(name) for name in names if name != "regex"}  # unguarded
    calls |= {
        "normalize_answer": normalize_answer, "last_boxed_content": last_boxed_content,
        "parse_verdict": parse_verdict, "answer_char_span": lambda text: answer_char_span(text, "8000"),
        "countdown_check": lambda text: check_countdown(text, [1, 2, 3], 6),
        "numeric_answer": numeric_answer, "latex_answer": latex_answer,
    }
    return calls


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_text_gets_an_answer_or_none_in_bounded_time(name):
    text = HOSTILE[name]
    for label, fn in _text_callables().items():
        start = time.process_time()  # CPU seconds: other processes on a loaded host do not count
        result = fn(text)  # must not raise
        elapsed = time.process_time() - start
        assert elapsed < BOUND_S, f"{label} took {elapsed:.2f}s on {name}"
        assert result is None or isinstance(result, (str, bool, tuple)), (label, type(result))


def test_the_issue_inputs_get_their_value():
    sevens = "7" * 4301
    assert EXTRACTORS.get("boxed")("\\boxed{" + sevens + "}") == sevens
    assert normalize_answer("-000" + sevens) == "-" + sevens
    assert EXTRACTORS.get("last_number")("so " + sevens + ".") == sevens
    assert normalize_answer("0" * 100_000) == "0"


def test_a_raising_extractor_yields_none_not_a_stopped_run(caplog):
    @EXTRACTORS.register("test_hostile_raises")
    def raises(text: str) -> str | None:
        raise ValueError("Exceeds the limit (4300 digits)")

    extract = make_extractor("test_hostile_raises")
    assert extract("\\boxed{1}") is None and extract("x") is None
    assert extract.failures == 2
    assert sum("test_hostile_raises" in r.getMessage() for r in caplog.records) == 1  # logged once


@pytest.mark.timeout(300)
def test_hostile_answers_reach_the_verifier_bounded():
    """Answers that reach math-verify (under its length cap) get a verdict, or None that says
    whether time ran out; the budget bounds them (a hang would trip the timeout mark)."""
    pytest.importorskip("math_verify")
    from urlvr.rewards.math_verify import MathVerifier, VerificationBudget

    verifier = MathVerifier(timeout_s=2.0, workers=2)
    try:
        budget = VerificationBudget(verifier, budget_s=4.0)
        answers = ["{" * 999, "}" * 999, "\x00" * 999, "7" * 999, "\\frac{" * 160, "7" * 100_000]
        verdicts = budget.verdicts([("1", a) for a in answers])
        assert all(v in (None, False) for v in verdicts)
    finally:
        verifier.close()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_text_never_raises_in_the_zoo_rewards(name):
    """SCOPE and EVOL-RL see the raw response text (EVOL-RL embeds it, SCOPE decodes its tokens):
    hostile text beside ordinary siblings gets finite scores, never an exception."""
    import torch

    from urlvr.rewards.base import REWARDS, RewardContext, call_reward
    from urlvr.rollout.base import Group, PromptInput, Sample

    texts = [HOSTILE[name], "2 + 3 = 5", HOSTILE[name][:1000]]
    ids = [(1, 2, 3), (4, 5), (6,)]
    group = Group(prompt=PromptInput(prompt_id="p", text="q", token_ids=(1,)),
                  samples=tuple(Sample(token_ids=i, logprobs=(0.0,) * len(i), text=t, finish_reason="length")
                                for t, i in zip(texts, ids)))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    stats = {"logprob": -torch.rand(3, 3), "top1_prob": torch.rand(3, 3), "top2_prob": torch.rand(3, 3) / 2}
    answers = [make_extractor("boxed")(t) for t in texts]
    ctx = RewardContext.for_group(answers, mask, extract_answer=lambda s: None, token_stats=stats,
                                  tokenizer=type("T", (), {"decode": staticmethod(lambda ids, **_: HOSTILE[name][:50])})())
    # evol_rl's default embedder (wordllama) comes with the dev extra
    runs = [("evol_rl", {"embedding": "tfidf"}), ("evol_rl", {}), ("scope", {"top_k": 2}), ("scope", {})]
    for reward, kwargs in runs:
        out = call_reward(REWARDS.get(reward), group, ctx, kwargs)
        assert len(out.scores) == 3
