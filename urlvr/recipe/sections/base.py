"""The base classes of every recipe section, and of a registered part's own section (a variant,
see `urlvr.recipe.variants`). A leaf: the parts that own sections (losses, engines) import it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class VariantSection(Section):
    """Base of a registered part's own section. Subclasses declare
    `name: Literal["<registered name>"] = "<registered name>"` and their knobs, each with a docstring."""

    name: str


def variant_section(entry: Any) -> type[VariantSection]:
    """The section class of a registry entry: the entry itself (a loss section) or its `settings`
    attribute (an engine class and the section of its settings)."""
    section = entry if isinstance(entry, type) and issubclass(entry, VariantSection) else getattr(entry, "settings", None)
    if not (isinstance(section, type) and issubclass(section, VariantSection)):
        raise TypeError(f"{entry!r} is neither a VariantSection nor has a `settings` VariantSection")
    return section


def check_variant_name(entry: Any, name: str) -> None:
    """Registration-time check that a variant's section carries the name it is registered under."""
    declared = variant_section(entry).model_fields["name"].default
    if declared != name:
        raise ValueError(f"{entry!r} is registered as {name!r} but its section's `name` defaults to {declared!r}")
