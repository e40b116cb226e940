"""Evaluation scores (avg@k, pass@k, maj@k, greedy) with the default label match and with a
judge reward (`eval.judge`), on hand-made groups whose right answers are known."""

from __future__ import annotations

import pytest

from urlvr.data.records import PromptRecord
from urlvr.metrics.evaluation import evaluate, judge_samples
from urlvr.rewards.extractors import EXTRACTORS
from urlvr.rollout.base import Group, PromptInput, Sample, SamplingParams


def _group(prompt_id: str, texts: list[str]) -> Group:
    prompt = PromptInput(prompt_id, prompt_id, (1,))
    return Group(prompt, tuple(Sample((2,), (0.0,), text, "eos") for text in texts))


class CannedEngine:
    """Returns fixed responses per prompt (k samples) and a fixed greedy response: the metric
    arithmetic is under test here, not sampling (engines are tested in test_rollout/test_vllm)."""

    uses_trainer_module = True

    def __init__(self, samples: dict[str, list[str]], greedy: dict[str, str]) -> None:
        self.samples, self.greedy = samples, greedy

    def generate(self, prompts, group_size, sampling):
        if sampling.greedy:
            return [_group(p.prompt_id, [self.greedy[p.prompt_id]]) for p in prompts]
        return [_group(p.prompt_id, self.samples[p.prompt_id][:group_size]) for p in prompts]


COUNTDOWN = [  # numbers 1 2 3, target 9: (1+2)*3 is right; 1+2+3 uses all but makes 6; 3*3 reuses 3
    PromptRecord("c0", "1 2 3 -> 9", "9", {"numbers": [1, 2, 3], "target": 9}),
    PromptRecord("c1", "2 5 7 -> 17", "17", {"numbers": [2, 5, 7], "target": 17}),
]
RIGHT, SUM, REUSE = "<answer>(1+2)*3</answer>", "<answer>1+2+3</answer>", "<answer>3*3</answer>"


def test_countdown_judge_accepts_any_right_expression_and_nothing_else():
    extract = EXTRACTORS.get("countdown_answer")
    group = _group("c0", [RIGHT, SUM, REUSE, "<answer>3*(2+1)</answer>", "no tags"])
    answers = [extract(s.text) for s in group.samples]
    assert judge_samples(group, COUNTDOWN[0], answers, extract, "countdown") == [True, False, False, True, False]
    # the default, "extracted answer == label", cannot judge expressions: nothing equals "9"
    assert judge_samples(group, COUNTDOWN[0], answers, extract, None) == [False] * 5


def test_evaluate_with_a_judge_hand_computed():
    engine = CannedEngine(
        samples={"c0": [RIGHT, SUM, RIGHT, REUSE], "c1": ["<answer>2*5+7</answer>", "<answer>7*2+5</answer>",
                                                       "<answer>7*2+5</answer>", "<answer>5+7</answer>"]},
        greedy={"c0": REUSE, "c1": "<answer>5*2+7</answer>"},
    )
    prompts = [PromptInput(r.prompt_id, r.prompt, (1,)) for r in COUNTDOWN]
    got = evaluate(engine, COUNTDOWN, prompts, samples_per_prompt=4, sampling=SamplingParams(), extractor="countdown_answer",
                   greedy=True, judge="countdown")
    # c0: 2 of 4 right, majority answer (1+2)*3 right; c1: 1 of 4 right (2*5+7), majority 7*2+5 = 19 wrong
    assert got["eval/avg@4"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert got["eval/pass@4"] == 1.0
    assert got["eval/maj@4"] == pytest.approx(0.5)
    assert got["eval/greedy_accuracy"] == pytest.approx(0.5)  # c0's greedy reuses 3; c1's 5*2+7 = 17
    assert got["eval/prompts"] == 2.0


def test_evaluate_default_label_match_hand_computed():
    records = [PromptRecord("a", "1+1", "2"), PromptRecord("b", "2+2", "4")]
    engine = CannedEngine(
        samples={"a": ["\\boxed{2}", "\\boxed{3}", "\\boxed{2}"], "b": ["\\boxed{5}", "no answer", "\\boxed{5}"]},
        greedy={"a": "\\boxed{2}", "b": "\\boxed{4}"},
    )
    prompts = [PromptInput(r.prompt_id, r.prompt, (1,)) for r in records]
    got = evaluate(engine, records, prompts, samples_per_prompt=3, sampling=SamplingParams(), extractor="boxed", greedy=True)
    assert got["eval/avg@3"] == pytest.approx((2 / 3 + 0) / 2)
    assert got["eval/pass@3"] == pytest.approx(0.5)
    assert got["eval/maj@3"] == pytest.approx(0.5)
    assert got["eval/greedy_accuracy"] == 1.0


def test_judge_must_be_a_registered_reward():
    from urlvr.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="eval.judge: .*unknown reward 'countdwn'"):
        load_recipe({"eval": {"judge": "countdwn"}})


def test_label_match_reads_digit_groups():
    """Issue 10, item 7: `\\boxed{8,000}` against the label 8000 is right in evaluation."""
    extract = EXTRACTORS.get("boxed")
    group = _group("p", ["\\boxed{8,000}", "\\boxed{8000}", "\\boxed{800}"])
    answers = [extract(s.text) for s in group.samples]
    for label in ("8000", "8,000"):
        record = PromptRecord("p", "q", label, {})
        assert judge_samples(group, record, answers, extract, None) == [True, True, False]
