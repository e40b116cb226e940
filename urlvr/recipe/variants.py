"""Variant sections: a recipe field whose value is the section of one registered part.

A policy loss, a rollout engine (and any other swappable part with knobs of its own) registers a
pydantic section under its name; the recipe field names it and sets its knobs in one mapping:

    algorithm:
      loss: {name: ppo_clip, clip_eps_high: 0.28}     # or just `loss: ppo_clip`

Why not a static `Union[...]`: plugins register variants after the recipe classes are defined
(they are imported by `recipe.plugins`, before validation), so the choices are read from the
registry when a recipe is validated and when the JSON schema or the docs are generated. The
schema is still the discriminated union (`oneOf` + `discriminator: name`) pydantic would write.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

from urlvr.registry import registry
from urlvr.section import VariantSection, variant_section


class VariantOf:
    """`Annotated[VariantSection, VariantOf("policy_loss", default="ppo_clip")]`: validates a name, a
    mapping with a `name` key (missing = `default`) or a section into the registered variant's
    section; errors carry the field path (`algorithm.loss.clip_eps_low`) and "did you mean"."""

    def __init__(self, kind: str, *, default: str) -> None:
        self.kind = kind  # a registry catalog key (`urlvr.recipe.names.RECIPE_KINDS`)
        self.default = default

    def choices(self) -> dict[str, type[VariantSection]]:
        """Registered name -> section class, plugins included."""
        found = registry(self.kind)
        return {name: variant_section(found.get(name)) for name in found.names()}

    def validate(self, value: Any) -> VariantSection:
        if isinstance(value, VariantSection):
            value = value.model_dump()
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, Mapping):
            raise PydanticCustomError("variant_type", "expected a registered name or a mapping with `name`")
        name = value.get("name", self.default)
        found = registry(self.kind)
        if not isinstance(name, str) or name not in found:
            raise PydanticCustomError("variant_unknown", found.unknown_name_message(str(name)))
        return variant_section(found.get(name)).model_validate({**value, "name": name})

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        # serialised by its runtime class, so every variant's own knobs round-trip
        return core_schema.no_info_plain_validator_function(
            self.validate, serialization=core_schema.plain_serializer_function_ser_schema(
                _dump, info_arg=True, return_schema=core_schema.dict_schema()))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        variants = [handler(section.__pydantic_core_schema__) for section in self.choices().values()]
        return {"oneOf": variants, "discriminator": {"propertyName": "name"}}


def _dump(value: BaseModel, info: core_schema.SerializationInfo) -> dict[str, Any]:
    return value.model_dump(mode=info.mode)


def variant_marker(field: Any) -> VariantOf | None:
    """The `VariantOf` of a pydantic field (`Annotated[..., VariantOf(...)]`), if any (docs and errors)."""
    for meta in getattr(field, "metadata", ()):
        if isinstance(meta, VariantOf):
            return meta
    return None
