"""The reward API: a reward sees a whole group and a context, and returns one score per sample.

    @reward("my_reward")
    def my_reward(group: Group, ctx: RewardContext, *, bonus: float = 0.0) -> list[float]:
        return [float(a is not None) + bonus for a in ctx.answers]

Why whole groups: ensemble rewards (majority vote, clustering) need every sibling's answer, and
certainty rewards need the per-token statistics the trainer already computed in its scoring
pass -- the context lends both, so neither needs a second forward pass or a custom manager.
Labels are lent only to rewards registered with ``needs_label=True`` (oracles); any other
reward touching ``ctx.label`` gets an error, so labels cannot leak into the training signal.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Annotated, Any, Literal, Protocol, get_args, runtime_checkable

import torch
from pydantic import BaseModel, TypeAdapter, ValidationError

from urlvr.algorithms.token_stats import TOKEN_STATS
from urlvr.errors import KnobError
from urlvr.registry import Registry, did_you_mean
from urlvr.rewards.knobs import derive_knob_section, knob_parameters, takes_any_knob
from urlvr.rollout.base import Group


class LabelAccessError(RuntimeError):
    """A reward not registered as an oracle asked for the ground-truth label."""


@dataclass(frozen=True)
class RewardContext:
    """What the trainer lends a reward for one group (G samples, T response positions)."""

    answers: tuple[str | None, ...]  # extracted answer per sample (None = no answer found)
    response_mask: torch.Tensor  # [G, T]
    token_stats: Mapping[str, torch.Tensor]  # name -> [G, T]: the statistics the run's rewards declared (`stats=`)
    extract_answer: Callable[[str], str | None]
    metadata: Mapping[str, Any] = field(default_factory=dict)  # the prompt record's metadata
    policy: Any = None  # PolicyHandle of the current policy; batch generation belongs in a `prepare` phase
    question: str | None = None  # the prompt record's question, before any template
    tokenizer: Any = None  # the policy's tokenizer (to map answer characters to tokens)
    vote_answers: tuple[str | None, ...] | None = None  # answers of all voting samples (>= G), trained ones first
    prepared: Any = None  # what this reward's batch phase (`prepare`) returned for this group
    _label: str | None = None
    _label_allowed: bool = False

    @property
    def label(self) -> str | None:
        """The prompt's ground-truth answer; only oracle rewards (needs_label=True) may read it."""
        if not self._label_allowed:
            raise LabelAccessError(
                "this reward is not registered with needs_label=True, so it cannot read the label "
                "(labels feed metrics and oracle rewards only)"
            )
        return self._label

    @classmethod
    def for_group(cls, answers: Sequence[str | None], response_mask: torch.Tensor, *, extract_answer: Callable[[str], str | None],
                  token_stats: Mapping[str, torch.Tensor] | None = None, label: str | None = None,
                  metadata: Mapping[str, Any] | None = None, question: str | None = None, tokenizer: Any = None,
                  vote_answers: Sequence[str | None] | None = None) -> RewardContext:
        """The one way the trainer and the evaluation build a context (the label stays private:
        `call_reward` opens it to oracle rewards only)."""
        return cls(answers=tuple(answers), response_mask=response_mask, token_stats=dict(token_stats or {}),
                   extract_answer=extract_answer, metadata=dict(metadata or {}), question=question, tokenizer=tokenizer,
                   vote_answers=None if vote_answers is None else tuple(vote_answers), _label=label)

    @property
    def has_label(self) -> bool:
        return self._label is not None

    def with_label_access(self, allowed: bool) -> RewardContext:
        return replace(self, _label_allowed=allowed)

    @property
    def voters(self) -> tuple[str | None, ...]:
        """Answers that vote: the extra voting samples when the recipe draws them, else `answers`."""
        return self.answers if self.vote_answers is None else self.vote_answers


@runtime_checkable
class PolicyHandle(Protocol):
    """Generation with the current policy, for rewards that ask the policy itself (verifiers,
    rephrasing). Questions are raw user text; the handle applies the run's prompt template and
    sends all of them through the rollout engine in one batched call."""

    def generate(
        self, questions: Sequence[str], *, samples_per_question: int = 1, max_new_tokens: int | None = None,
        temperature: float | None = None, top_p: float | None = None, as_task: bool = False,
    ) -> list[list[str]]:
        """Return, per question, `samples_per_question` response texts. None settings are the
        run's rollout settings; temperature 0 is greedy. `as_task=True` also appends the run's
        `data.prompt_suffix`, so the question is posed exactly like a training prompt.
        Call it equally often on every rank, with an empty list if need be: under ZeRO-3 it
        gathers the parameters, a collective operation."""
        ...


@dataclass(frozen=True)
class RewardOutput:
    """Scores plus optional named per-sample diagnostics (logged as `reward/<term>/<name>`) and,
    for a reward registered with `timed`, how many of the group's verifications ran out of time
    (summed over the step and logged as `reward/<term>_timeouts`)."""

    scores: Sequence[float]
    diagnostics: Mapping[str, Sequence[float]] = field(default_factory=dict)
    timeouts: int = 0


RewardFn = Callable[..., "Sequence[float] | RewardOutput"]
# prepare(groups, contexts, policy, **kwargs) -> one object per group, lent as `ctx.prepared`
PrepareFn = Callable[..., Sequence[Any]]


# What a reward's score claims, which decides the label metrics that mean something for it
# (paper App. B.2; docs/dynamics.md):
#   "verdict"   -- score > 0.5 says "this sample is correct" (majority vote, self-verification,
#                  verifiers, oracles): Reward Accuracy (Eq. 40) is defined.
#   "certainty" -- a graded confidence, higher = preferred, no threshold (self-certainty, entropies,
#                  probability, cluster share): Label Accuracy of the top-reward sample (Eq. 43)
#                  and the reward/correctness correlation are defined.
#   "other"     -- neither (e.g. `format`); the default for a reward that does not say.
RewardFamily = Literal["verdict", "certainty", "other"]
REWARD_FAMILIES: tuple[str, ...] = get_args(RewardFamily)


@dataclass(frozen=True)
class RewardSpec:
    name: str
    fn: RewardFn
    needs_label: bool
    description: str
    prepare: PrepareFn | None = None  # optional batch phase, run once per step over all groups
    family: RewardFamily = "other"  # what the score claims (see RewardFamily)
    stats: tuple[str, ...] | Callable[..., Sequence[str]] = ()  # token statistics read from ctx.token_stats
    timed: bool | Callable[..., bool] = False  # verifies under a time limit and counts RewardOutput.timeouts
    declared_knobs: type[BaseModel] | None = None  # the knob section, where the signature cannot express it

    @cached_property
    def knobs(self) -> type[BaseModel]:
        """The section of this reward's recipe knobs (`reward.terms[].kwargs`): the declared one, else
        derived from the signature (`urlvr.rewards.knobs.derive_knob_section`) on first use and kept.
        First use, not registration: a signature may name a type its module defines further down."""
        return self.declared_knobs or derive_knob_section(self.name, self.fn)

    def is_timed(self, kwargs: Mapping[str, Any]) -> bool:
        """Whether, with these recipe kwargs, this reward's verifications can run out of time
        (then its `reward/<term>_timeouts` count is logged every step, 0 included)."""
        return bool(self.timed(**kwargs) if callable(self.timed) else self.timed)

    def token_stats(self, kwargs: Mapping[str, Any]) -> tuple[str, ...]:
        """The statistics this reward reads with these recipe kwargs (the scoring pass computes
        exactly the union over the recipe's rewards, metrics and detectors)."""
        return tuple(self.stats(**kwargs) if callable(self.stats) else self.stats)


def _check_reward_kwargs(spec: RewardSpec, name: str, kwargs: Mapping[str, Any]) -> None:
    """Load-time check of a recipe term: the kwargs validate against the reward's knob section
    (`RewardSpec.knobs`: no unknown knob, every required one given, each value fits its type, so
    `anchor: unifrom` fails before step 1), no scalar reaches the reward other than as its type
    says (`_refuse_scalar_coercion`), and the reward's own ``check`` (an optional attribute for
    cross-argument rules) accepts the combination. A problem with one knob is a `KnobError`
    naming it (the recipe points at `kwargs.<knob>`); an unknown knob a ValueError of the term."""
    section = spec.knobs
    # a knob the section does not list is refused unless both the section and the function take any
    # (a declared section that ignores extra keys would otherwise pass them to a function without them)
    if section.model_config.get("extra") == "forbid" or not takes_any_knob(spec.fn):
        accepted = list(section.model_fields)
        for key in kwargs:
            if key not in accepted:
                # `{votes:3}` in YAML is the key 'votes:3' with no value: say so, the name looks right
                hint = "; YAML reads `{a:1}` as the key 'a:1', write `{a: 1}`" if ":" in str(key) else \
                    did_you_mean(key, accepted)
                raise ValueError(f"reward {name!r} takes no argument {key!r} (it takes: {', '.join(accepted) or 'none'}){hint}")
    try:
        section.model_validate(dict(kwargs))
    except ValidationError as err:
        problem = err.errors()[0]
        key = str(problem["loc"][0]) if problem["loc"] else ""
        if problem["type"] == "missing":
            raise KnobError(f"reward {name!r} needs the knob {key!r} (it has no default)", knob=key) from None
        if key in kwargs:
            raise KnobError(f"reward {name!r}: argument {key!r}={kwargs[key]!r} is invalid ({problem['msg']})", knob=key) from None
        raise ValueError(f"reward {name!r}: {problem['msg']}") from None  # a declared section's own cross-knob rule
    for key, value in kwargs.items():
        if key in section.model_fields:
            annotation = section.model_fields[key].annotation
            _refuse_scalar_coercion(name, key, value, _knob_adapter(section, key), annotation)
    if hasattr(spec.fn, "check"):
        try:
            spec.fn.check(**kwargs)
        except (TypeError, LookupError) as err:  # a check's own slip must still read as one line naming the reward
            raise ValueError(f"reward {name!r}: {err}") from None
    for stat in spec.token_stats(kwargs):
        if stat not in TOKEN_STATS:
            raise ValueError(f"reward {name!r} declares stats=({stat!r},): {TOKEN_STATS.unknown_name_message(stat)}")


_ADAPTERS: dict[tuple[type[BaseModel], str], TypeAdapter] = {}  # (knob section, knob) -> its validator


def _knob_adapter(section: type[BaseModel], key: str) -> TypeAdapter:
    """The validator of one knob alone (its annotation with its constraints), made once."""
    if (section, key) not in _ADAPTERS:
        field = section.model_fields[key]
        annotation = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
        try:
            _ADAPTERS[section, key] = TypeAdapter(annotation)
        except Exception:  # a type pydantic cannot build a validator for alone: the section checked it
            _ADAPTERS[section, key] = TypeAdapter(Any)
    return _ADAPTERS[section, key]


REWARDS: Registry[RewardSpec] = Registry("reward", check_kwargs=_check_reward_kwargs)


def reward(
    name: str, *, needs_label: bool = False, prepare: PrepareFn | None = None, family: RewardFamily = "other",
    stats: tuple[str, ...] | Callable[..., Sequence[str]] = (), timed: bool | Callable[..., bool] = False,
    knobs: type[BaseModel] | None = None,
) -> Callable[[RewardFn], RewardFn]:
    """Register ``fn(group, ctx, **kwargs)`` as a reward named ``name``; returns fn unchanged.

    ``stats`` names the per-token statistics (registry `TOKEN_STATS`) the reward reads from
    ``ctx.token_stats``, or is a function of the recipe kwargs returning them; the scoring pass
    computes only what some part of the run declared, so an undeclared statistic is absent.

    ``prepare``, if given, is a batch phase: ``prepare(groups, contexts, policy, **kwargs)`` runs
    once per step over every group of the batch (so work such as generating with the policy is one
    batched call) and returns one object per group, which ``fn`` reads as ``ctx.prepared``. It
    receives the recipe kwargs its own signature names.

    ``family`` says what a score claims -- ``"verdict"`` (score > 0.5 = judged correct),
    ``"certainty"`` (graded confidence) or ``"other"`` -- and so which label metrics are logged
    and what the Model Collapse Step watches (docs/dynamics.md).

    ``timed`` (or a function of the recipe kwargs returning it) says the reward verifies under a
    time limit and reports, in ``RewardOutput.timeouts``, the verifications that ran out of time,
    so a timeout is counted (``reward/<term>_timeouts``), never silently scored as a wrong answer.

    ``knobs`` declares the section of the recipe knobs (a pydantic model, `extra="forbid"`, a
    docstring under each field) where the signature cannot express them (a constraint, a
    cross-knob rule); by default it is derived from the signature (`urlvr.rewards.knobs`). Either
    way `urlvr schema`, the recipe reference and `urlvr rewards NAME` list the knobs, and a
    recipe's `kwargs` are validated against them. The reward still receives the values as written.
    """
    if family not in REWARD_FAMILIES:
        raise ValueError(f"reward {name!r}: family must be one of {', '.join(REWARD_FAMILIES)}, got {family!r}")

    def add(fn: RewardFn) -> RewardFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        if not callable(stats) and isinstance(stats, str):
            raise TypeError(f"reward {name!r}: stats must be a tuple of names, got the string {stats!r}")
        if knobs is not None and not takes_any_knob(fn):
            missing = [k for k in knobs.model_fields if k not in {p.name for p in knob_parameters(fn)}]
            if missing:
                raise TypeError(f"reward {name!r}: its knobs section declares {', '.join(missing)}, which the function does not take")
        REWARDS.register(name)(RewardSpec(name, fn, needs_label, doc[0] if doc else "", prepare, family,
                                          stats if callable(stats) else tuple(stats), timed, knobs))
        return fn

    return add


def check_reward_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
    """Load-time check of a recipe term's kwargs against the reward `name` (`_check_reward_kwargs`);
    the recipe reaches the same check through the registry catalog."""
    REWARDS.check_kwargs(name, kwargs)


def _refuse_scalar_coercion(name: str, key: str, value: Any, adapter: Any, annotation: Any) -> None:
    """Refuse a scalar that lax validation would convert but the reward would receive as written:
    the string "0.6" for a float, true for an int, 1.0 for the literal 1. The reward gets the
    recipe's value, not pydantic's conversion, so `"0.6"` would reach `0.5 <= share` as a str.
    An int for a float is fine (Python's arithmetic treats them alike); containers stay lax."""
    if not isinstance(value, (str, bool, float)):
        return
    try:
        converted = adapter.validate_python(value, strict=True)
    except ValidationError:
        converted = None
    else:
        if type(converted) is type(value):
            return
    wanted = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
    hint = ""
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text, quoted or not
        hint = (" (YAML reads an exponent without a dot as text: write 1.0e-3, not 1e-3)"
                if "e" in value.lower() and _is_number(value) else " (write it unquoted)")
    raise KnobError(f"reward {name!r}: argument {key!r}={value!r} is a {type(value).__name__}; the knob takes {wanted}{hint}",
                    knob=key)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def reward_knobs(spec: RewardSpec) -> list[tuple[str, str, str]]:
    """(name, type, default) of each recipe knob of a reward, read from its knob section
    (`RewardSpec.knobs`, itself read from the signature), so the listing cannot drift from the
    code. A knob without a default prints `required`; an unannotated one `any`."""
    knobs = []
    for name, knob in spec.knobs.model_fields.items():
        annotation = knob.annotation
        if annotation is Any:
            kind = "any"
        elif isinstance(annotation, type):
            kind = annotation.__name__
        else:
            kind = str(annotation).replace("typing.", "")
        knobs.append((name, kind, "required" if knob.is_required() else repr(knob.get_default(call_default_factory=True))))
    return knobs


def describe_reward(spec: RewardSpec) -> str:
    """What `urlvr rewards NAME` prints: name, family, oracle or not, the token statistics it
    declares, its whole docstring, and its knobs (`reward_knobs`)."""
    stats = spec.stats if not callable(spec.stats) else "depends on the knobs"
    head = (f"{spec.name}  (family: {spec.family}{', oracle: reads the label' if spec.needs_label else ''}; "
            f"token statistics: {', '.join(stats) if isinstance(stats, tuple) and stats else stats or 'none'})")
    lines = [head, "", inspect.cleandoc(spec.fn.__doc__ or "(no docstring)"), "", "knobs (recipe: reward.terms[].kwargs):"]
    knobs = reward_knobs(spec)
    width = max((len(n) for n, _, _ in knobs), default=0)
    lines += [f"  {n:{width}s}  {kind}  = {default}" for n, kind, default in knobs] or ["  none"]
    return "\n".join(lines)


def call_reward(spec: RewardSpec, group: Group, ctx: RewardContext, kwargs: Mapping[str, Any]) -> RewardOutput:
    """Run one reward on one group and check it returned one finite float per sample."""
    out = spec.fn(group, ctx.with_label_access(spec.needs_label), **kwargs)
    if not isinstance(out, RewardOutput):
        out = RewardOutput(scores=out)
    scores = [float(s) for s in out.scores]
    if len(scores) != group.size:
        raise ValueError(f"reward {spec.name!r} returned {len(scores)} scores for a group of {group.size}")
    if not all(torch.isfinite(torch.tensor(scores, dtype=torch.float64))):
        raise ValueError(f"reward {spec.name!r} returned a non-finite score: {scores}")
    if not (isinstance(out.timeouts, int) and out.timeouts >= 0):
        raise ValueError(f"reward {spec.name!r} returned timeouts={out.timeouts!r}; expected a count >= 0")
    return RewardOutput(scores=scores, diagnostics=out.diagnostics, timeouts=out.timeouts)
