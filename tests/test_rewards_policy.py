"""Rewards that ask the policy itself: self-verification (P1/P2) and Co-Reward, through the batch
phase (one generate call per step), and the EnginePolicy handle on a real tiny model."""

import pytest
import torch

import urlvr.builtins  # noqa: F401
from urlvr.rewards.base import PolicyHandle, RewardContext, check_reward_kwargs
from urlvr.rewards.compose import RewardTermSpec, score_batch
from urlvr.rewards.extractors import extract_boxed
from urlvr.rewards.self_verification import PROMPT_1, PROMPT_2, parse_verdict, verification_prompt
from urlvr.rollout.base import Group, PromptInput, Sample


class ScriptedPolicy:
    """A PolicyHandle that records each call and answers with `reply(question, k)`."""

    def __init__(self, reply):
        self.reply = reply
        self.calls = []

    def generate(self, questions, *, samples_per_question=1, max_new_tokens=None, temperature=None, top_p=None,
                 as_task=False):
        self.calls.append({"questions": list(questions), "n": samples_per_question, "temperature": temperature,
                           "as_task": as_task})
        return [[self.reply(q, k) for k in range(samples_per_question)] for q in questions]


def countdown_group(prompt_id, texts, numbers=(3, 5, 2), target=16, **metadata):
    samples = tuple(Sample((1,), (0.0,), t, "eos") for t in texts)
    group = Group(PromptInput(prompt_id, "templated", (5,)), samples)
    ctx = RewardContext(answers=tuple(extract_boxed(t) for t in texts), response_mask=torch.ones(len(texts), 1),
                        token_stats={}, extract_answer=extract_boxed, question=f"question {prompt_id}",
                        metadata={"numbers": list(numbers), "target": target, **metadata})
    return group, ctx


def test_scripted_policy_is_a_policy_handle():
    assert isinstance(ScriptedPolicy(lambda q, k: ""), PolicyHandle)


def test_paper_prompts_render_verbatim():
    text = PROMPT_2.format(expr="(3+5)*2", nums=[3, 5, 2], target=16)
    assert 'evaluate the provided expression "(3+5)*2".' in text
    assert "3. Each number from [3, 5, 2] must appear exactly once in \"(3+5)*2\"." in text
    assert text.endswith("If and only if all checks pass, output \\boxed{True}. Otherwise, output \\boxed{False}.")
    assert PROMPT_1.format(expr="e", nums=[1], target=2).splitlines()[0:2] == [
        "Verify:", '1. "e" only contains numbers from [1].']


@pytest.mark.parametrize("text, verdict", [
    ("... \\boxed{True}", True), ("\\boxed{False}", False), ("\\boxed{ true }", True), ("\\boxed{\\text{False}}", False),
    ("\\boxed{True} wait \\boxed{False}", False), ("\\boxed{maybe}", None), ("no verdict", None),
    ("\\fbox{True}", True), ("\\boxed {False}", False), ("$\\boxed True$", True), ("\\boxed{\\textbf{True}}", True),
    ("\\boxed{True", None), ("\\boxed{" + "7" * 5000 + "}", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) is verdict


def test_self_verification_one_batched_call_and_verdicts():
    a = countdown_group("a", ["\\boxed{(3+5)*2}", "\\boxed{3+5+2}", "none"])
    b = countdown_group("b", ["\\boxed{1+1}", "\\boxed{(3+5)*2}", "\\boxed{2}"], numbers=(1, 1), target=2)
    policy = ScriptedPolicy(lambda q, k: "\\boxed{True}" if '"(3+5)*2"' in q else "\\boxed{nonsense}")
    term = RewardTermSpec("self_verification", 1.0, {"prompt": "p2"})
    out = score_batch([a[0], b[0]], [a[1], b[1]], [term], oracle=None, policy=policy)
    assert len(policy.calls) == 1  # every answered sample of the step in one call
    assert len(policy.calls[0]["questions"]) == 5  # the unanswered sample is never sent
    assert policy.calls[0]["questions"][0] == PROMPT_2.format(expr="(3+5)*2", nums=[3, 5, 2], target=16)
    assert policy.calls[0]["temperature"] == 0.0
    assert out.total.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    assert out.diagnostics["self_verification/unparsed_verdict"][0].tolist() == [0.0, 1.0, 0.0]


def test_self_verification_calls_the_policy_even_with_nothing_to_verify():
    a = countdown_group("a", ["none", "none"])  # no answers on this rank: still one (empty) call
    policy = ScriptedPolicy(lambda q, k: "\\boxed{True}")
    out = score_batch([a[0]], [a[1]], [RewardTermSpec("self_verification", 1.0, {})], oracle=None, policy=policy)
    assert [c["questions"] for c in policy.calls] == [[]] and out.total.tolist() == [[0.0, 0.0]]


def test_self_verification_custom_prompt_is_checked_at_load_time():
    check_reward_kwargs("self_verification", {"prompt": "Is {expr} right for {question}? \\boxed{{True}}"})
    assert verification_prompt("p1") is PROMPT_1
    with pytest.raises(ValueError, match="format string"):
        check_reward_kwargs("self_verification", {"prompt": "Is {answer} right?"})
    with pytest.raises(ValueError, match="format string"):
        check_reward_kwargs("self_verification", {"prompt": "no fields at all"})


def test_co_reward_uses_data_rephrasing_and_votes_across_both():
    # original majority "16"; the rephrased question's answers vote "8"
    a = countdown_group("a", ["\\boxed{16}", "\\boxed{16}", "\\boxed{8}", "x"], rephrased="Q-a rephrased")
    policy = ScriptedPolicy(lambda q, k: ["\\boxed{8}", "\\boxed{8}", "\\boxed{16}"][k])
    out = score_batch([a[0]], [a[1]], [RewardTermSpec("co_reward", 1.0, {"rephrased_samples": 3})], None, policy)
    assert policy.calls[1:] == [{"questions": ["Q-a rephrased"], "n": 3, "temperature": None, "as_task": True}]
    assert policy.calls[0]["questions"] == []  # nothing to rephrase, yet the call is made (ranks stay in step)
    assert out.total.tolist() == [[1.0, 1.0, 1.0, 0.0]]  # Table 2: 1[own majority] + 1[rephrased majority]
    cross_only = score_batch([a[0]], [a[1]], [RewardTermSpec("co_reward", 1.0, {"rephrased_samples": 3,
                                                                               "include_original": False})], None, policy)
    assert cross_only.total.tolist() == [[0.0, 0.0, 1.0, 0.0]]


def test_co_reward_rephrases_with_the_policy_when_the_data_has_none():
    a = countdown_group("a", ["\\boxed{4}", "\\boxed{4}"])
    b = countdown_group("b", ["\\boxed{5}", "\\boxed{6}"], rephrased="given")

    def reply(question, k):
        return "A, said differently" if question.startswith("Rephrase the following") else "\\boxed{4}"

    policy = ScriptedPolicy(reply)
    out = score_batch([a[0], b[0]], [a[1], b[1]], [RewardTermSpec("co_reward", 1.0, {})], None, policy)
    assert len(policy.calls) == 2  # one greedy rephrasing call, one answering call
    assert policy.calls[0]["temperature"] == 0.0 and "question a" in policy.calls[0]["questions"][0]
    assert policy.calls[1]["questions"] == ["A, said differently", "given"] and policy.calls[1]["n"] == 2
    assert out.total.tolist() == [[2.0, 2.0], [1.0, 0.0]]


def test_engine_policy_generates_through_the_rollout_engine(random_tiny_model):
    from urlvr.rewards.policy import EnginePolicy
    from urlvr.rollout.base import SamplingParams
    from urlvr.rollout.transformers_engine import TransformersRolloutEngine

    _, model, tokenizer = random_tiny_model
    engine = TransformersRolloutEngine(model, tokenizer)
    policy = EnginePolicy(engine, tokenizer, template="Q: {prompt}\nA:", prompt_suffix=" go",
                          sampling=SamplingParams(max_new_tokens=5), seed=3)
    first = policy.generate(["1+1", "2+2"], samples_per_question=2)
    assert [len(texts) for texts in first] == [2, 2]
    again = EnginePolicy(engine, tokenizer, template="Q: {prompt}\nA:", sampling=SamplingParams(max_new_tokens=5), seed=3)
    assert again.generate(["1+1", "2+2"], samples_per_question=2) == first  # seeded: reproducible
    greedy = policy.generate(["1+1"], samples_per_question=2, temperature=0.0, as_task=True)
    assert greedy[0][0] == greedy[0][1]  # temperature 0 is greedy
    assert policy.calls == 2 and policy.generated == 6


@pytest.mark.parametrize("template", ["Q: {prompt}", "chat"])
def test_engine_policy_prompts_carry_bos_exactly_once(bos_tokenizer, template):
    from urlvr.data.records import PromptRecord
    from urlvr.data.templates import encode_prompts
    from urlvr.rewards.policy import EnginePolicy

    class RecordingEngine:
        uses_trainer_module = True

        def __init__(self):
            self.prompts = []

        def generate(self, prompts, group_size, sampling):
            self.prompts.extend(prompts)
            return [Group(p, tuple(Sample((2,), (0.0,), "ok", "eos") for _ in range(group_size))) for p in prompts]

    engine = RecordingEngine()
    EnginePolicy(engine, bos_tokenizer, template=template).generate(["1+1"])
    (prompt,) = engine.prompts
    assert prompt.token_ids.count(bos_tokenizer.bos_token_id) == 1 and prompt.token_ids[0] == 1
    # the same ids the training prompts get
    (trained,) = encode_prompts(bos_tokenizer, [PromptRecord("q", "1+1")], template=template,
                                max_prompt_length=64).inputs
    assert prompt.token_ids == trained.token_ids


def test_documented_batch_phase_example_works_with_a_policy(monkeypatch):
    from pathlib import Path

    from test_docs import test_python_blocks_run
    from urlvr.rewards.base import REWARDS

    # run the page's blocks against a copy of the registry, so test_docs can run them again later
    monkeypatch.setattr(REWARDS, "_entries", {k: v for k, v in REWARDS._entries.items() if not k.endswith("_example")
                                              and k != "boxed_and_short"})
    test_python_blocks_run(Path(__file__).resolve().parents[1] / "docs" / "writing-rewards.md")
    a = countdown_group("a", ["\\boxed{1}", "\\boxed{2}", "none"])
    policy = ScriptedPolicy(lambda q, k: "yes" if "Is 1 " in q else "no")
    out = score_batch([a[0]], [a[1]], [RewardTermSpec("policy_says_yes_example", 1.0, {})], None, policy)
    assert len(policy.calls) == 1 and out.total.tolist() == [[1.0, 0.0, 0.0]]
