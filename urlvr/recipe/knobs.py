"""Knob sections: a recipe term `{name: X, kwargs: {...}}` whose `kwargs` are the knobs of the
registered part X, each with its own section (a reward's: `urlvr.rewards.knobs`).

    reward:
      terms: [{name: cuma, kwargs: {majority_share: 0.6}}]

The spelling stays a name plus a mapping, but the mapping is typed: the registry validates it
against X's section (`Registry.check_kwargs`), a knob's error points at `kwargs.<knob>`, and the
JSON schema and the recipe reference list every part's knobs, read from the registry when they
are generated, so a plugin's show up too. (A variant section, `urlvr.recipe.variants`, writes
the knobs beside the name instead; a reward term keeps its `weight`, `gate`, ... there.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, GetJsonSchemaHandler, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from urlvr.errors import KnobError
from urlvr.registry import registry


class KnobsOf:
    """`Annotated[dict[str, Any], KnobsOf("reward")]`: the field holds the knobs of the part its
    term names (`name`); each registry entry carries its section as `.knobs`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # a registry catalog key (`urlvr.recipe.names.RECIPE_KINDS`)

    def choices(self) -> dict[str, type[BaseModel]]:
        """Registered name -> knob section, plugins included."""
        found = registry(self.kind)
        return {name: found.get(name).knobs for name in found.names()}

    def check(self, name: str, kwargs: Mapping[str, Any], field: str) -> None:
        """The registry's load-time check of `kwargs` for `name`; a `KnobError` becomes a pydantic
        error located at `<field>.<knob>` (one line: `reward.terms.0.kwargs.majority_share: ...`),
        any other ValueError stays the term's."""
        try:
            registry(self.kind).check_kwargs(name, kwargs)
        except KnobError as err:
            raise ValidationError.from_exception_data("knobs", [InitErrorDetails(
                type=PydanticCustomError("value_error", "{message}", {"message": str(err)}),
                loc=(field, err.knob), input=kwargs.get(err.knob))]) from None


def knobs_marker(field: Any) -> KnobsOf | None:
    """The `KnobsOf` of a pydantic field, if any (the schema and the recipe reference)."""
    for meta in getattr(field, "metadata", ()):
        if isinstance(meta, KnobsOf):
            return meta
    return None


def term_json_schema(model: type[BaseModel], schema: dict[str, Any], handler: GetJsonSchemaHandler) -> dict[str, Any]:
    """The JSON schema of a term section (`schema`, pydantic's) as a union discriminated by
    `name`: one member per registered part, its `name` a constant and each knob field (a field
    marked `KnobsOf`) that part's knob section."""
    base = handler.resolve_ref_schema(schema)
    markers = {name: knobs_marker(field) for name, field in model.model_fields.items() if knobs_marker(field)}
    names = next(iter(markers.values())).choices() if markers else {}
    members = []
    for part in names:
        properties = {**base["properties"], "name": {"const": part, "title": "Name", "type": "string"}}
        for field, marker in markers.items():
            properties[field] = {**handler(marker.choices()[part].__pydantic_core_schema__),
                                 **{k: v for k, v in base["properties"][field].items() if k in ("description", "default")}}
        members.append({**base, "title": f"{base.get('title', model.__name__)}[{part}]", "properties": properties})
    if not members:
        return base
    kept = {k: base[k] for k in ("title", "description") if k in base}
    return {"oneOf": members, "discriminator": {"propertyName": "name"}, **kept}
