"""Load-time checks of registered names: a recipe naming an unknown part fails before step 1."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import core_schema

from urlvr.registry import Registry, registry


# the registries a recipe names, by catalog key (urlvr.registry.catalog_key of their kind)
RECIPE_KINDS = (
    "reward", "extractor", "rollout_engine", "group_filter", "advantage_estimator", "policy_loss", "token_filter",
    "mismatch_correction", "loss_aggregation", "kl_estimator", "collapse_detector", "token_statistic",
    "dataset_adapter", "data_source", "tracker", "advantage_shaper",
)


def registries() -> dict[str, Registry]:
    """Every registry a recipe can name, from the registry catalog (its modules made and filled
    them: `urlvr/__init__.py` imports `urlvr.builtins`, a recipe's plugins are imported before
    validation). Looked up, never imported: the parts live in the layers above the recipe."""
    return {kind: registry(kind) for kind in RECIPE_KINDS}


def check_registered(kind: str, name: str) -> str:
    """Return ``name`` if registered under ``kind``; else raise ValueError with a suggestion."""
    found = registry(kind)
    if name not in found:
        raise ValueError(found.unknown_name_message(name))
    return name


class Registered:
    """`Annotated[str, Registered("reward")]`: a field naming a registered part. Checked at load time
    with a "did you mean"; the JSON schema and the recipe reference list the registry's names at
    the moment they are generated, so a plugin's parts show up there too."""

    def __init__(self, kind: str, *, validate: bool = True) -> None:
        self.kind = kind  # a registry catalog key (`RECIPE_KINDS`)
        self.validate = validate  # False: the section checks the name itself (e.g. with the kwargs)

    def names(self) -> list[str]:
        return registry(self.kind).names()

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        if not self.validate:
            return handler(source)
        return core_schema.no_info_after_validator_function(lambda name: check_registered(self.kind, name), handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        out = handler(schema)
        out["examples"] = self.names()  # not an enum: a plugin's names are valid once imported
        return out


def registered_marker(field: Any) -> Registered | None:
    """The `Registered` of a pydantic field, of its list items or of its optional value, if any."""
    for meta in getattr(field, "metadata", ()):
        if isinstance(meta, Registered):
            return meta
    for arg in get_args(getattr(field, "annotation", None)):
        for meta in getattr(arg, "__metadata__", ()):
            if isinstance(meta, Registered):
                return meta
    return None
