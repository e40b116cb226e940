"""The rollout protocol: what every engine (transformers, vLLM) takes and returns.

A ``Group`` holds all samples of one prompt and is the unit that crosses module boundaries:
rewards see whole groups, mini-batches and ranks are cut between groups, never inside one.

An engine is a variant (recipe/variants.py): registered in ``ROLLOUT_ENGINES`` under a name, it
carries its own recipe section as ``settings`` (``rollout.engine: {name: vllm, sync_bucket_mb: 64}``)
and builds itself with ``from_recipe``. A new engine is one module (docs/writing-engines.md).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch

from urlvr.data.records import PromptInput  # noqa: F401  (re-exported: engines take prompts in this form)
from urlvr.section import VariantSection, check_variant_name
from urlvr.registry import Registry

from urlvr.dist import DistInfo
from urlvr.recipe import Recipe

FinishReason = Literal["eos", "stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``top_k = 0`` and ``top_p = 1.0`` switch those filters off.

    ``prompt_seeds``, when given, holds one seed per prompt of the ``generate`` call and takes
    precedence over ``seed``: each sample then draws from its own generator, seeded by its
    prompt's seed and its index in the group, so a prompt's samples do not depend on which
    other prompts share the call (nor, in a trainer, on the world size).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    greedy: bool = False
    prompt_seeds: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Sample:
    """One sampled response. ``logprobs[t]`` is the sampler's log-probability of
    ``token_ids[t]`` under the distribution it was drawn from: logits / temperature, then
    top-k and top-p applied and renormalised (vLLM's ``processed_logprobs``; greedy: temperature
    1, no filter). That is the behaviour policy of importance sampling. With the filters off it is
    what the trainer recomputes; with ``top_p < 1`` or ``top_k > 0`` it exceeds the trainer's
    unfiltered log-prob by -log(mass kept) (see docs/vllm.md, sampler/trainer mismatch)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    finish_reason: FinishReason


@dataclass(frozen=True)
class Group:
    """All ``group_size`` samples of one prompt."""

    prompt: PromptInput
    samples: tuple[Sample, ...]
    policy_version: int | None = None  # the version of the policy that sampled every sample (a server's
    # engine tags it: trainer/producer.py); None = the trainer's current policy (a colocated engine)

    @property
    def size(self) -> int:
        return len(self.samples)


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples grouped responses from the current policy.

    ``settings`` is the engine's own recipe section (a ``VariantSection`` whose ``name`` is the
    registered name); the trainer builds the engine with ``from_recipe``, which reads those
    settings from ``recipe.rollout.engine``. ``uses_trainer_module`` says whether the engine
    samples from the trainer's own module (then ZeRO-3 must gather its parameters around
    ``generate``) or from a copy of its own (then ``sync_weights`` copies).
    """

    settings: ClassVar[type[VariantSection]]
    uses_trainer_module: bool

    @classmethod
    def from_recipe(cls, recipe: Recipe, model: torch.nn.Module, tokenizer, dist: DistInfo) -> RolloutEngine:
        """Build this rank's engine for ``model`` (the module the trainer optimizes) on ``dist.device``;
        ``recipe.rollout.engine`` is an instance of ``settings``."""
        ...

    def generate(
        self, prompts: Sequence[PromptInput], group_size: int, sampling: SamplingParams
    ) -> list[Group]:
        """Return one ``Group`` per prompt, in prompt order, each with ``group_size`` samples."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (a no-op when shared)."""
        ...

    def offload(self) -> None:
        """Free accelerator memory for the actor's update until the next ``generate`` or
        ``sync_weights`` (a no-op for engines that hold nothing of their own)."""
        ...


@dataclass(frozen=True)
class Served:
    """One request's answer from an engine that samples apart from the trainer: the groups (each
    tagged with the `policy_version` that sampled it) and the times, in seconds."""

    groups: list[Group]
    version: int
    waited_s: float  # how long `collect` blocked the trainer
    server_idle_s: float  # how long the engine sat idle (waiting for weights or this request) since its last generation
    generate_s: float  # its generation time


@runtime_checkable
class OverlappingRolloutEngine(RolloutEngine, Protocol):
    """An engine that samples apart from the trainer (its section sets the class attribute
    ``overlaps_training = True``), so that ``trainer.max_staleness`` can keep rollouts in flight
    while the trainer trains (trainer/producer.py; docs/async.md). On top of the protocol:"""

    def submit(self, prompts: Sequence[PromptInput], group_size: int, sampling: SamplingParams, version: int) -> int:
        """Ask for ``generate``'s groups, sampled by policy ``version``; return a ticket at once."""
        ...

    def collect(self, ticket: int) -> Served:
        """Wait for a ticket's groups; an error when they were sampled by another version."""
        ...

    def push_weights(self, model: torch.nn.Module, version: int) -> None:
        """Make the engine sample ``model``'s weights as policy ``version`` (collective, like ``sync_weights``)."""
        ...


def protocol_members(protocol: type) -> tuple[str, ...]:
    """The members a protocol class declares: its annotated attributes, then its public methods."""
    methods = [name for name, value in vars(protocol).items() if not name.startswith("_")
               and (inspect.isfunction(value) or isinstance(value, (classmethod, staticmethod)))]
    return (*protocol.__annotations__, *methods)


def _signature_gap(cls: type, name: str, protocol: type = RolloutEngine) -> str | None:
    """Why `cls.<name>` cannot be called the way the trainer calls `RolloutEngine.<name>` (not a
    classmethod where the protocol's is one, parameters that do not take the protocol's
    arguments), or None when it can."""
    declared, found = inspect.getattr_static(protocol, name), inspect.getattr_static(cls, name)
    if isinstance(declared, classmethod) and not isinstance(found, classmethod):
        return "is not a classmethod (the trainer calls it on the class)"
    wanted = [p for p in inspect.signature(getattr(protocol, name)).parameters if p not in ("self", "cls")]
    try:
        signature = inspect.signature(getattr(cls, name))
    except (TypeError, ValueError):  # a callable without a readable signature: nothing to compare
        return None
    parameters = list(signature.parameters.values())
    if not isinstance(found, (classmethod, staticmethod)):
        parameters = parameters[1:]  # a plain function read off the class: drop `self`
    try:
        signature.replace(parameters=parameters).bind(*wanted)
    except TypeError:
        return f"takes {signature} where the trainer passes ({', '.join(wanted)})"
    return None


def check_engine(cls: Any, name: str) -> None:
    """Registration-time check of an engine class against the `RolloutEngine` protocol: its section
    carries `name` (`check_variant_name`), and every member the trainer uses is on the class and
    takes the protocol's arguments. Engines register when their module is imported, that is when a
    recipe's `plugins` load, before any model is loaded or anything sampled (before this check an
    engine without `offload` failed at the first update). TypeError naming the first missing or
    mis-declared member; `uses_trainer_module` must be a class attribute for the same reason."""
    check_variant_name(cls, name)
    where = f"rollout engine {name!r} ({getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)!s})"
    # an engine whose section says it samples apart from the trainer also needs the overlap members
    overlaps = getattr(getattr(cls, "settings", None), "overlaps_training", False)
    members = protocol_members(RolloutEngine) + (protocol_members(OverlappingRolloutEngine) if overlaps else ())
    for member in members:
        protocol = RolloutEngine if hasattr(RolloutEngine, member) or member in RolloutEngine.__annotations__ \
            else OverlappingRolloutEngine
        if not hasattr(cls, member):
            kind = "attribute" if member in RolloutEngine.__annotations__ else "method"
            raise TypeError(f"{where} has no {kind} {member!r} of the {protocol.__name__} protocol (it needs: "
                            f"{', '.join(members)}; docs/writing-engines.md)")
        flag = inspect.getattr_static(cls, member)
        if member == "uses_trainer_module" and not isinstance(flag, (bool, property)):
            # None would read as "a copy of its own": ZeRO-3 would then sample from ungathered shards
            raise TypeError(f"{where}: uses_trainer_module is {flag!r}, not True or False")
        if member not in RolloutEngine.__annotations__ and not callable(getattr(cls, member)):
            raise TypeError(f"{where}: {member} is a {type(getattr(cls, member)).__name__}, not a method "
                            "(the trainer calls it)")
        gap = None if member in RolloutEngine.__annotations__ else _signature_gap(cls, member, protocol)
        if gap:
            raise TypeError(f"{where}: {member} {gap}")


ROLLOUT_ENGINES: Registry[type[RolloutEngine]] = Registry("rollout engine", check=check_engine)


def hashed_seed(*keys: object, bits: int = 63) -> int:
    """A seed of ``bits`` bits from a hash of ``keys``: nearby keys (steps, prompt indices, sample
    indices) give unrelated random streams, and the same keys the same seed on any machine."""
    digest = hashlib.blake2b(":".join(map(str, keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - bits)


def eos_token_ids(tokenizer, config_eos: int | Iterable[int] | None) -> frozenset[int]:
    """Ids that end a response with reason "eos": the tokenizer's eos plus the model's
    ``generation_config.eos_token_id`` (an int or a list: chat models such as Qwen list several)."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    if config_eos is not None:
        ids.update(int(i) for i in ([config_eos] if isinstance(config_eos, int) else config_eos))
    return frozenset(ids)


def context_length(model: torch.nn.Module) -> int | None:
    """The most tokens, prompt and response together, that ``model`` takes: its config's
    ``max_position_embeddings`` (GPT-2's ``n_positions`` answers to that name too); None when the
    config names none (then nothing is capped).

    Why the config and not the tokenizer's ``model_max_length``: the positions are the model's
    limit (learned position embeddings have no row past it; rotary ones run on, silently, outside
    what the model was trained on), the tokenizer's value is often a placeholder (1e30 when unset)
    or set apart from the model, and the config is what vLLM reads for its own ``max_model_len``."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def response_budget(prompt: PromptInput, max_new_tokens: int, limit: int | None, limit_name: str) -> int:
    """The most response tokens ``prompt`` may get: min(max_new_tokens, limit - prompt length).

    Both engines cap a response here; one that reaches the cap ends with reason ``length``, like
    one that reaches ``max_new_tokens`` (counted as truncated). A prompt that alone fills the
    limit leaves no room: ValueError naming it and ``limit_name``. Training and evaluation prompts
    never get here (``encode_prompts`` refuses or skips them at start-up, by ``data.on_long_prompt``);
    a reward's request to the policy (self-verification: question + response + instruction) can."""
    if limit is None:
        return max_new_tokens
    room = limit - len(prompt.token_ids)
    if room < 1:
        raise ValueError(f"prompt {prompt.prompt_id!r} has {len(prompt.token_ids)} tokens and {limit_name} "
                         f"is {limit}: no room for a response")
    return min(max_new_tokens, room)


def check_generate_request(prompts: Sequence[PromptInput], group_size: int, sampling: SamplingParams) -> None:
    """The arguments every engine refuses alike, before it samples anything (ValueError)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if sampling.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
    if not sampling.greedy and sampling.temperature <= 0:
        raise ValueError(f"temperature must be > 0 (or greedy=True), got {sampling.temperature}")
    for prompt in prompts:
        if not prompt.token_ids:
            raise ValueError(f"prompt {prompt.prompt_id!r} has no tokens")
    if sampling.prompt_seeds is not None and len(sampling.prompt_seeds) != len(prompts):
        raise ValueError(f"prompt_seeds has {len(sampling.prompt_seeds)} seeds for {len(prompts)} prompts")


def finish_reason(last_token: int, *, capped: bool, eos_ids: Iterable[int], stop_ids: Iterable[int]) -> FinishReason:
    """Why a response ended, from its last token: an eos id wins, then a stop id, then the cap
    (``capped``: it reached its ``response_budget``). The order of current vLLM's ``check_stop``;
    earlier vLLM v1 releases checked the cap first (a response whose last allowed token is eos
    came back as ``length``), so the vLLM engine asks this function too."""
    if last_token in set(eos_ids):
        return "eos"
    if last_token in set(stop_ids):
        return "stop"
    if not capped:
        raise ValueError(f"a response ended on token {last_token}, neither an eos nor a stop id, below its cap")
    return "length"


@dataclass(frozen=True)
class RolloutBatch:
    """Groups collated into right-padded tensors for the scoring and training passes.

    Rows are ordered group by group: row ``g * group_size + j`` is sample ``j`` of group ``g``.
    """

    input_ids: torch.Tensor  # [B*G, P+T]   prompt left-padded, response right-padded
    attention_mask: torch.Tensor  # [B*G, P+T]
    response_mask: torch.Tensor  # [B*G, T]  1 on response tokens (incl. eos), 0 on padding
    sampler_logprobs: torch.Tensor  # [B*G, T]  Sample.logprobs: after temperature and top-k/top-p
    prompt_length: int  # P: response token t sits at column P + t
    group_size: int
