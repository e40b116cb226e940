"""Variant sections: a recipe field whose value is the section of one registered part.

A policy loss, a rollout engine (and any other swappable part with knobs of its own) registers a
pydantic section under its name; the recipe field names it and sets its knobs in one mapping:

    algorithm:
      loss: {name: ppo_clip, clip_eps_high: 0.28}     # or just `loss: ppo_clip`

Why not a static `Union[...]`: plugins register variants after the recipe classes are defined
(they are imported by `recipe.plugins`, before validation), so the choices are read from the
registry when a recipe is validated and when the JSON schema or the docs are generated. The
schema is still the discriminated union (`oneOf` + `discriminator: name`) pydantic would write.

A data source keys its variants by `kind` instead (`data: {source: {kind: file, path: ...}}`): the
`datasets` source has a knob called `name`, and every recipe already wrote `kind`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, SchemaValidator, core_schema

from urlvr.registry import registry
from urlvr.section import RegisteredSection, variant_section


class VariantOf:
    """`Annotated[VariantSection, VariantOf("policy_loss", default="ppo_clip")]`: validates a name, a
    mapping with a `name` key (missing = `default`; with `default=None` it must be given) or a
    section into the registered variant's section; errors carry the field path
    (`algorithm.loss.clip_eps_low`) and "did you mean". `key` names the field that picks the variant
    (`kind` for data sources); `name_in_path` puts the chosen name into error paths, as a pydantic
    discriminated union does (`data.source.file.path`)."""

    def __init__(self, kind: str, *, default: str | None, key: str = "name", name_in_path: bool = False,
                 where: Callable[[type[RegisteredSection]], bool] | None = None, why: str = "") -> None:
        self.kind = kind  # a registry catalog key (`urlvr.recipe.names.RECIPE_KINDS`)
        self.default = default
        self.key = key
        self.name_in_path = name_in_path
        self.where = where  # only the variants whose section passes (a server's backend: no other server)
        self.why = why  # said when a registered variant that fails `where` is named

    def choices(self) -> dict[str, type[RegisteredSection]]:
        """Registered name -> section class, plugins included (those `where` admits)."""
        found = registry(self.kind)
        sections = {name: variant_section(found.get(name)) for name in found.names()}
        return {name: section for name, section in sections.items() if self.where is None or self.where(section)}

    def chosen_name(self, value: Any) -> Any:
        """The variant name a recipe value picks (a name, or the key of a mapping), else None."""
        if isinstance(value, str):
            return value
        return value.get(self.key, self.default) if isinstance(value, Mapping) else None

    def validate(self, value: Any) -> RegisteredSection:
        if isinstance(value, RegisteredSection):
            value = value.model_dump()
        if isinstance(value, str):
            value = {self.key: value}
        found = registry(self.kind)
        if not isinstance(value, Mapping):
            raise PydanticCustomError("variant_type", f"expected a registered {found.kind} name or a mapping with "
                                                      f"`{self.key}`")
        name = value.get(self.key, self.default)
        if name is None:
            raise PydanticCustomError("variant_missing", f"no `{self.key}`: name the {found.kind} "
                                                         f"(known: {', '.join(found.names())})")
        if not isinstance(name, str) or name not in found:
            raise PydanticCustomError("variant_unknown", found.unknown_name_message(str(name)))
        section = variant_section(found.get(name))
        if self.where is not None and not self.where(section):
            raise PydanticCustomError("variant_excluded", f"{name} cannot be used here: {self.why} (one of: "
                                                          f"{', '.join(self.choices())})")
        if self.name_in_path:
            return _tagged_validator(section, self.key, name).validate_python({**value, self.key: name})
        return section.model_validate({**value, self.key: name})

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        # serialised by its runtime class, so every variant's own knobs round-trip
        return core_schema.no_info_plain_validator_function(
            self.validate, serialization=core_schema.plain_serializer_function_ser_schema(
                _dump, info_arg=True, return_schema=core_schema.dict_schema()))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        variants = [handler(section.__pydantic_core_schema__) for section in self.choices().values()]
        return {"oneOf": variants, "discriminator": {"propertyName": self.key}}


_TAGGED: dict[tuple[type[RegisteredSection], str, str], SchemaValidator] = {}


def _tagged_validator(section: type[RegisteredSection], key: str, name: str) -> SchemaValidator:
    """A validator of `section` whose error locations start with `name` (a one-member tagged union)."""
    found = (section, key, name)
    if found not in _TAGGED:
        _TAGGED[found] = SchemaValidator(core_schema.tagged_union_schema({name: section.__pydantic_core_schema__}, key))
    return _TAGGED[found]


def _dump(value: BaseModel, info: core_schema.SerializationInfo) -> dict[str, Any]:
    return value.model_dump(mode=info.mode)


def variant_marker(field: Any) -> VariantOf | None:
    """The `VariantOf` of a pydantic field (`Annotated[..., VariantOf(...)]`), of its optional value
    or of its list items or map values, if any (docs and errors)."""
    for meta in getattr(field, "metadata", ()):
        if isinstance(meta, VariantOf):
            return meta
    return _marker_in(getattr(field, "annotation", None))


def _marker_in(annotation: Any) -> VariantOf | None:
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, VariantOf):
            return meta
    for arg in get_args(annotation):
        found = _marker_in(arg)
        if found is not None:
            return found
    return None


def variant_container(annotation: Any) -> type | None:
    """`list` or `dict` when a variant field holds several variants (`list[DataSource]`, `dict[str,
    DataSource]`, optional or not), else None (one variant, optional or not)."""
    if get_origin(annotation) in (list, dict):
        return get_origin(annotation)
    for arg in get_args(annotation) if get_origin(annotation) in (Union, UnionType) else ():
        if get_origin(arg) in (list, dict):
            return get_origin(arg)
    return None
