"""Reward terms, their composition and the metrics-only oracle (`reward`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import Field, GetJsonSchemaHandler, model_validator
from pydantic_core import core_schema

from urlvr.recipe.knobs import KnobsOf, term_json_schema
from urlvr.recipe.names import Registered, check_registered
from urlvr.registry import registry, repeated
from urlvr.section import Section


REWARD_KNOBS = KnobsOf("reward")  # a term's `kwargs`: the knobs of the reward it names


class RewardTerm(Section):
    name: Annotated[str, Registered("reward", validate=False)]
    """A registered reward (`urlvr rewards` lists them with their formulas)."""
    weight: float = 1.0
    """Weight of this term in the summed reward."""
    kwargs: Annotated[dict[str, Any], REWARD_KNOBS] = Field(default_factory=dict)
    """The reward's knobs (its keyword arguments): each reward's are listed below, read from its
    signature, and checked at load time. The reward receives them as written."""
    alias: str | None = Field(None, min_length=1)
    """Name of this term in metrics (`reward/<alias>_mean`); default the reward's name. Needed
    when one reward appears twice with different kwargs. Not `proxy`, nor `ground_truth` beside
    an oracle (the run's own `reward/proxy_mean` and `reward/ground_truth_mean`)."""
    gate: Annotated[str, Registered("reward", validate=False)] | None = None
    """A registered reward whose per-sample score multiplies this term's, e.g. `format` (1 when an
    answer was extracted) to zero a certainty reward on answerless samples; null = ungated."""
    on_error: Literal["raise", "zero"] = "raise"
    """If the reward raises: `raise` stops the run with a message naming the reward and the
    prompt; `zero` scores that group 0 and counts it (`reward/<term>/error_rate`). Never silent."""

    @model_validator(mode="after")
    def _known_and_kwargs_fit(self) -> RewardTerm:
        check_registered("reward", self.name)
        if self.gate is not None:
            check_registered("reward", self.gate)
        REWARD_KNOBS.check(self.name, self.kwargs, "kwargs")
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        # one member per registered reward, its `kwargs` that reward's knobs (`urlvr.recipe.knobs`)
        return term_json_schema(cls, handler(schema), handler)

    @property
    def metric_name(self) -> str:
        """The term's name in metrics and in `BatchRewards.per_term`: its `alias`, else the reward's name."""
        return self.alias or self.name


class RewardSection(Section):
    terms: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="majority_vote")], min_length=1)
    """Reward terms; the training reward is their weighted sum."""
    extractor: Annotated[str, Registered("extractor")] = "boxed"
    """Answer extractor by name, e.g. `boxed`: the last `\\boxed{...}`."""
    extractor_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the extractor, e.g. `{pattern: "Answer: (.*)"}` for `regex`."""
    answer_from_truncated: bool = True
    """Whether a response cut at `rollout.max_new_tokens` (finish reason `length`) may carry an
    answer. true (verl's and TTRL's behaviour): the extractor reads whatever text there is, so a
    truncated response votes and can be scored right. false: it has no answer (None) wherever
    the run reads answers (rewards and votes, the oracle's metrics, evaluation, greedy probes):
    it does not vote and scores 0 on majority vote and ground truth. Use false with extractors
    that find an answer anywhere (`last_number`): a cut-off restatement of the question
    ("To add 54 and 83, we'll") otherwise votes `83` (docs/rewards.md, measured on SmolLM2)."""
    oracle: Annotated[str, Registered("reward")] | None = "ground_truth"
    """Reward computed alongside for METRICS ONLY where labels exist (ground-truth reward,
    reward accuracy); null to skip. It never enters the training signal."""
    certainty_logits: Literal["scaled", "raw"] = "scaled"
    """Logits the certainty statistics lent to rewards are measured on: `scaled` = divided by the
    rollout temperature (the distribution the samples came from), `raw` = the model's own. They
    coincide at temperature 1.0 (the paper's), where `raw` is refused, as it is when no reward term
    reads a token statistic. The update's log-probs are always `scaled`."""
    vote_group_size: int | None = Field(None, ge=1)
    """Samples drawn per prompt for voting rewards (majority vote, semantic cluster); the first
    `rollout.group_size` are trained, all of them vote (TTRL: 64 votes, 32 trained). null = group_size."""

    @model_validator(mode="after")
    def _terms_unique_and_extractor_kwargs_fit(self) -> RewardSection:
        keys = [term.metric_name for term in self.terms]
        twice = repeated(keys)
        if twice:
            raise ValueError(f"reward term {twice[0]!r} appears twice; give one an `alias`")
        if "oracle" in keys and self.oracle is not None:  # reward/oracle_timeouts is the oracle's
            raise ValueError("a reward term named 'oracle' would share metrics with `reward.oracle`; give it another `alias`")
        for term in self.terms:  # reward/<metric_name>_mean must not overwrite the run's own means
            oracle_itself = term.name == self.oracle and not term.kwargs and term.gate is None  # the same scores
            if term.metric_name == "proxy" or (term.metric_name == "ground_truth" and self.oracle is not None
                                               and not oracle_itself):
                whose = "the summed proxy reward" if term.metric_name == "proxy" else f"the oracle's ({self.oracle})"
                raise ValueError(f"reward term {term.name!r} would be logged as reward/{term.metric_name}_mean, "
                                 f"which is {whose}: give it another `alias`")
        registry("extractor").check_kwargs(self.extractor, dict(self.extractor_kwargs))
        return self


def reward_family(terms: Sequence[tuple[str, float]]) -> tuple[str, int | None]:
    """What the training reward of these (reward name, weight) terms claims, and, for a verdict,
    the index of the term whose scores are the verdict. Zero-weight terms do not count.

    verdict   -- exactly one counted term, a verdict with weight > 0 (its own scores, after any
                 gate, are read with the 0.5 threshold; a sum of terms is no longer a verdict)
    other     -- every counted term is "other"
    certainty -- anything else: a graded score whose top sample and correlation mean something
    (the families: `urlvr.rewards.base.RewardFamily`; here because the recipe's checks read it too)
    """
    rewards = registry("reward")
    counted = [(i, rewards.get(name).family, weight) for i, (name, weight) in enumerate(terms) if weight != 0]
    if len(counted) == 1 and counted[0][1] == "verdict" and counted[0][2] > 0:
        return "verdict", counted[0][0]
    if all(family == "other" for _, family, _ in counted):
        return "other", None
    return "certainty", None
