"""Evaluation scores (avg@k, pass@k, maj@k, greedy) with the default label match and with a
judge reward (`eval.judge`), on hand-made groups whose right answers are known."""

from __future__ import annotations

from fractions import Fraction

import pytest

import urlvr.builtins  # noqa: F401  (registers the built-in rewards the judges name)
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


# --------------------------------------------------------------------------- every eval option runs
def test_evaluate_without_greedy_reports_no_greedy_accuracy():
    records = [PromptRecord("a", "1+1", "2")]
    engine = CannedEngine(samples={"a": ["\\boxed{2}", "\\boxed{3}"]}, greedy={"a": "\\boxed{2}"})
    prompts = [PromptInput("a", "1+1", (1,))]
    got = evaluate(engine, records, prompts, samples_per_prompt=2, sampling=SamplingParams(), extractor="boxed",
                   greedy=False)
    assert got == {"eval/avg@2": 0.5, "eval/pass@2": 1.0, "eval/maj@2": 1.0, "eval/prompts": 1.0}


WHEN = {"before": {"at_start": True}, "every": {"every_steps": 1}, "after": {"at_end": True},
        "all": {"at_start": True, "every_steps": 1, "at_end": True}}
EVAL_STEPS = {"before": [0], "every": [1, 2], "after": [2], "all": [0, 1, 2]}


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "no_greedy"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("judge", [None, "ground_truth"], ids=["label_match", "judge"])
@pytest.mark.parametrize("when", sorted(WHEN))
def test_every_eval_option_combination_trains(greedy, k, judge, when, random_tiny_model, tmp_path):
    """A tiny two-step run per combination of the `eval` section's options (timing x greedy x k x
    judge, with and without held-out sets): each evaluates when asked and logs exactly its keys."""
    import urlvr
    from conftest import small_run_recipe

    held_out = {"extra": {"kind": "arithmetic", "num_problems": 2, "seed": 7}} if k == 3 else {}
    source = {"kind": "arithmetic", "num_problems": 2, "seed": 99}
    recipe = small_run_recipe(random_tiny_model[0], tmp_path / "run", trainer={"total_steps": 2},
                              rollout={"group_size": 2, "max_new_tokens": 4},
                              eval={**WHEN[when], "source": source, "held_out": held_out, "samples_per_prompt": k,
                                    "greedy": greedy, "judge": judge, "max_new_tokens": 4})
    result = urlvr.train(recipe)
    assert [e["step"] for e in result.evaluations] == EVAL_STEPS[when]
    names = ["eval"] + [f"eval/{name}" for name in held_out]
    wanted = {f"{n}/{m}" for n in names for m in (f"avg@{k}", f"pass@{k}", f"maj@{k}", "prompts")}
    wanted |= {f"{n}/greedy_accuracy" for n in names} if greedy else set()
    for row in result.evaluations:
        assert set(row) - {"step"} == wanted
        assert all(0.0 <= row[f"{n}/avg@{k}"] <= row[f"{n}/pass@{k}"] <= 1.0 for n in names)
    assert len((result.run_dir / "eval.jsonl").read_text().splitlines()) == len(EVAL_STEPS[when])


# --------------------------------------------------------------------------- pass@k
def _pass_at_k_reference(n: int, c: int, k: int) -> Fraction:
    """1 - P(no correct sample among k drawn without replacement from n), as a product of exact
    fractions over the draws (not the closed form the code uses)."""
    none_correct = Fraction(1)
    for draw in range(k):
        none_correct *= Fraction(n - c - draw, n - draw) if n - c - draw > 0 else Fraction(0)
    return 1 - none_correct


def test_pass_at_k_matches_an_exact_reference_on_a_grid():
    from urlvr.metrics.evaluation import pass_at_k

    for n in range(1, 41):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_pass_at_k_reference(n, c, k)), abs=1e-12), (n, c, k)
    assert pass_at_k(5, 0, 2) == 0.0 and pass_at_k(5, 5, 5) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 = c / n


@pytest.mark.parametrize("n,c,k", [(2, 0, 5), (2, 1, 5), (4, 4, 5), (3, 1, 0), (3, 4, 2), (3, -1, 2)])
def test_pass_at_k_refuses_undefined_arguments(n, c, k):
    from urlvr.metrics.evaluation import pass_at_k

    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(n, c, k)


def test_evaluation_follows_the_truncated_answer_rule():
    """`reward.answer_from_truncated: false` reaches evaluation: a right answer in a response cut
    at the cap is not counted (the same rule as the training reward's votes)."""
    from urlvr.metrics.evaluation import evaluate
    from urlvr.rollout.base import Group, PromptInput, SamplingParams, Sample

    class Fixed:  # an engine that returns the same two responses for every prompt
        def generate(self, prompts, group_size, sampling):
            return [Group(p, (Sample((1,), (0.0,), "\\boxed{4}", "length"), Sample((1,), (0.0,), "\\boxed{4}", "stop")))
                    for p in prompts]

    records = [PromptRecord("a", "2+2", "4")]
    prompts = [PromptInput("a", "2+2", (1,))]
    scores = {allowed: evaluate(Fixed(), records, prompts, samples_per_prompt=2, sampling=SamplingParams(),
                                extractor="boxed", answer_from_truncated=allowed) for allowed in (True, False)}
    assert scores[True]["eval/avg@2"] == 1.0 and scores[False]["eval/avg@2"] == 0.5
