"""The base classes of every recipe section, and of a registered part's own section (a variant,
see `urlvr.recipe.variants`). A leaf (pydantic only): the parts that own sections (losses,
engines, filters) import it without pulling in the recipe package above it."""

from __future__ import annotations

import types
import typing
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator


def _numeric(annotation: Any) -> bool:
    """int, float, or an optional / union of them (bool excluded: it is a number to pydantic)."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(a in (int, float) for a in args)
    return False


def _numeric_items(annotation: Any) -> bool:
    """A list or tuple of numbers (`list[int]`, `tuple[float, float]`), optional or not."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_numeric_items(a) for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) not in (list, tuple):
        return False
    args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
    return bool(args) and all(_numeric(a) for a in args)


def _boolean_where_a_number_belongs(annotation: Any, value: Any) -> str | None:
    """The offending spelling (`true`, `0.true`) of a boolean given for a number, else None."""
    if isinstance(value, bool) and _numeric(annotation):
        return str(value).lower()
    if isinstance(value, (list, tuple)) and _numeric_items(annotation):
        for index, item in enumerate(value):
            if isinstance(item, bool):
                return f"{str(item).lower()} (item {index})"
    return None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        """`total_steps: true` would be read as 1 and `betas: [false, 0.99]` as beta1 = 0 (pydantic's
        lax mode): refuse a boolean where a number, or a list of numbers, belongs."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                found = _boolean_where_a_number_belongs(field.annotation, value) if field is not None else None
                if found is not None:
                    raise ValueError(f"{name}: expected a number, got {found}")
        return data

    def changed(self, *names: str) -> list[str]:
        """Those of `names` whose value is not the field's default: what a check for a knob that
        would do nothing refuses. (Only a value can be told apart: a resolved recipe is saved with
        every field written out, so "set to the default" and "unset" read back the same.)"""
        fields = type(self).model_fields
        return [name for name in names if getattr(self, name) != fields[name].get_default(call_default_factory=True)]


class RegisteredSection(Section):
    """Base of a registered part's own section: the field named `variant_key` carries the name the
    part is registered under (`urlvr.recipe.variants.VariantOf` reads it to pick the section)."""

    variant_key: ClassVar[str] = "name"


class VariantSection(RegisteredSection):
    """Base of a registered part's own section keyed by `name`. Subclasses declare
    `name: Literal["<registered name>"] = "<registered name>"` and their knobs, each with a docstring.
    (A family whose parts need `name` as a knob of their own keys by another field: a data source
    by `kind`, `urlvr.data.loaders.DataSourceSection`.)"""

    name: str


def variant_section(entry: Any) -> type[RegisteredSection]:
    """The section class of a registry entry: the entry itself (a loss section) or its `settings`
    attribute (an engine class and the section of its settings)."""
    section = entry if isinstance(entry, type) and issubclass(entry, RegisteredSection) else getattr(entry, "settings", None)
    if not (isinstance(section, type) and issubclass(section, RegisteredSection)):
        raise TypeError(f"{entry!r} is neither a VariantSection nor has a `settings` VariantSection")
    return section


def check_variant_name(entry: Any, name: str) -> None:
    """Registration-time check that a variant's section carries the name it is registered under
    (in its `variant_key` field: `name`, or `kind` for a data source)."""
    section = variant_section(entry)
    key = section.variant_key
    declared = section.model_fields[key].default if key in section.model_fields else None
    if declared != name:
        raise ValueError(f"{entry!r} is registered as {name!r} but its section's `{key}` defaults to {declared!r}")
