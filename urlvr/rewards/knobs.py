"""A reward's knobs as a pydantic section, derived once from its signature.

    @reward("cuma")
    def cuma(group, ctx, *, majority_share: float = 0.5): ...   ->   class CumaKnobs: majority_share: float = 0.5

Why a section: a recipe writes a reward's knobs as `kwargs` of its term
(`{name: cuma, kwargs: {majority_share: 0.6}}`); with a section per reward they are validated
like every other recipe field, listed by `urlvr schema` (the term is a union discriminated by
`name`) and in the generated recipe reference, exactly as a loss's or an engine's own section.
The section is read from the function (annotations + defaults, the knob's text from the
docstring), so it cannot drift from the code; a reward whose knobs a signature cannot express
declares its section instead (`reward(..., knobs=MySection)`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model


class RewardKnobs(BaseModel):
    """Base of a reward's knob section: unknown knobs refused. Defaults are the signature's and are
    not re-validated (a reward may default a knob to None that the recipe must not set to None)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, arbitrary_types_allowed=True)


class _OpenRewardKnobs(RewardKnobs):
    """A reward taking `**kwargs`: any further knob is the reward's own business."""

    model_config = ConfigDict(extra="allow")


def knob_parameters(fn: Callable[..., Any]) -> list[inspect.Parameter]:
    """The recipe knobs of a reward function: its parameters after (group, ctx), `*args` and
    `**kwargs` left out; annotations resolved where they can be (else as written)."""
    try:
        params = inspect.signature(fn, eval_str=True).parameters
    except Exception:  # annotations that cannot be resolved at runtime: keep them as written
        params = inspect.signature(fn).parameters
    return [p for p in list(params.values())[2:] if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def takes_any_knob(fn: Callable[..., Any]) -> bool:
    """Whether the reward takes `**kwargs` (then no knob name is refused)."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def derive_knob_section(name: str, fn: Callable[..., Any]) -> type[RewardKnobs]:
    """`<Name>Knobs`: one field per knob of `fn` (`knob_parameters`), typed by its annotation
    (`Any` where there is none, or where it is a string that did not resolve or a type pydantic
    cannot check: the reward checks those itself), defaulted by its default (none = required),
    described by what the docstring says of it (`knob_text`)."""
    doc = inspect.cleandoc(fn.__doc__ or "")
    fields: dict[str, Any] = {}
    for param in knob_parameters(fn):
        annotation = _checkable(param.annotation)
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (annotation, Field(default, description=knob_text(doc, param.name) or None))
    title = "".join(part[:1].upper() + part[1:] for part in re.split(r"[\W_]+", name) if part) + "Knobs"
    base = _OpenRewardKnobs if takes_any_knob(fn) else RewardKnobs
    return create_model(title, __base__=base, __module__=getattr(fn, "__module__", __name__), **fields)


def _checkable(annotation: Any) -> Any:
    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        return Any
    try:
        TypeAdapter(annotation)
    except Exception:  # a type pydantic cannot validate: the reward checks it itself
        return Any
    return annotation


def knob_text(doc: str, knob: str) -> str:
    """What a reward's docstring says of `knob`, in one line: the sentence that starts with
    `` `knob` `` (up to the next `; `other`` clause: "`timeout_s` per comparison; `budget_s` for
    all ..."), else the parenthesis right after it ("Knobs: `lam` (0.7, the code's)"); "" if the
    docstring does not document it."""
    text = " ".join(doc.split())
    mark = f"`{knob}`"
    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z`])", text):
        for clause in re.split(r";\s+(?=`)", sentence):
            said = clause[len(mark):].lstrip(":").strip()
            if clause.startswith(mark) and not said.startswith("("):  # "`lam` (0.7 ...)": the parenthesis, below
                return said.rstrip(".;,")
    found = re.search(re.escape(mark) + r" \(((?:[^()]|\([^()]*\))*)\)", text)
    return found.group(1).strip() if found else ""
