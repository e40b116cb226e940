"""`EnginePolicy`: the `PolicyHandle` the trainer lends to rewards that ask the policy itself.

Self-verification and policy-generated rephrasing need the *current* policy to answer new
prompts. The handle renders each question with the run's own prompt template, and sends all of
a call's questions through the run's rollout engine at once (one batched call), inside the
actor's generation context (parameters gathered under ZeRO-3). Seeds are derived from the step's
seed, the call number and the question's index, so a step's verification is reproducible.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from urlvr.data.records import PromptRecord
from urlvr.data.templates import encode_prompt_text, render_prompt
from urlvr.rollout.base import PromptInput, RolloutEngine, SamplingParams, hashed_seed


class EnginePolicy:
    """Generate with the current policy through a rollout engine (see the module docstring)."""

    def __init__(
        self, engine: RolloutEngine, tokenizer: Any, *, template: str, system_prompt: str | None = None,
        prompt_suffix: str = "", sampling: SamplingParams | None = None, seed: int = 0,
        generation_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.template = template
        self.system_prompt = system_prompt
        self.prompt_suffix = prompt_suffix
        self.sampling = sampling or SamplingParams()  # the run's rollout settings: the defaults here
        self.seed = seed
        self.generation_context = generation_context or contextlib.nullcontext
        self.calls = 0  # generate() calls so far (each gets fresh seeds)
        self.generated = 0  # responses generated so far (for metrics)

    def generate(
        self, questions: Sequence[str], *, samples_per_question: int = 1, max_new_tokens: int | None = None,
        temperature: float | None = None, top_p: float | None = None, as_task: bool = False,
    ) -> list[list[str]]:
        """Per question, `samples_per_question` response texts from the current policy (see PolicyHandle).

        An empty call still enters the generation context, so that ranks stay in step under ZeRO-3.
        """
        call = self.calls
        self.calls += 1
        prompts = []
        for index, question in enumerate(questions):
            record = PromptRecord(prompt_id=f"policy-{call}-{index}", prompt=question)
            text = render_prompt(self.tokenizer, record, template=self.template, system_prompt=self.system_prompt,
                                 suffix=self.prompt_suffix if as_task else "")
            ids = encode_prompt_text(self.tokenizer, text, template=self.template)
            prompts.append(PromptInput(record.prompt_id, text, ids))
        temperature = self.sampling.temperature if temperature is None else temperature
        sampling = replace(
            self.sampling, temperature=temperature if temperature > 0 else 1.0, greedy=temperature == 0,
            top_p=self.sampling.top_p if top_p is None else top_p,
            max_new_tokens=self.sampling.max_new_tokens if max_new_tokens is None else max_new_tokens,
            seed=None, prompt_seeds=tuple(self._seed(call, index) for index in range(len(prompts))),
        )
        with self.generation_context():
            groups = self.engine.generate(prompts, samples_per_question, sampling) if prompts else []
        self.generated += len(prompts) * samples_per_question
        return [[sample.text for sample in group.samples] for group in groups]

    def _seed(self, call: int, index: int) -> int:
        return hashed_seed(self.seed, "policy", call, index, bits=62)
