"""Load-time checks of registered names: a recipe naming an unknown part fails before step 1."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import core_schema

from urlvr.registry import Registry


def registries() -> dict[str, Registry]:
    """Every registry a recipe can name, with the built-ins registered (imported lazily so
    that importing the recipe module stays cheap)."""
    import urlvr.builtins  # noqa: F401  (registers built-in parts)
    from urlvr.data.adapters import DATASET_ADAPTERS
    from urlvr.metrics.collapse import COLLAPSE_DETECTORS
    from urlvr.rewards.base import REWARDS
    from urlvr.rewards.extractors import EXTRACTORS
    from urlvr.rollout.base import ROLLOUT_ENGINES
    from urlvr.algorithms.advantages import ADVANTAGE_ESTIMATORS
    from urlvr.trainer.group_filters import GROUP_FILTERS
    from urlvr.algorithms.losses import KL_ESTIMATORS, LOSS_AGGREGATIONS
    from urlvr.algorithms.mismatch import MISMATCH_CORRECTIONS
    from urlvr.algorithms.policy_losses import POLICY_LOSSES
    from urlvr.algorithms.token_filters import TOKEN_FILTERS
    from urlvr.algorithms.token_stats import TOKEN_STATS

    return {
        "reward": REWARDS,
        "extractor": EXTRACTORS,
        "rollout_engine": ROLLOUT_ENGINES,
        "group_filter": GROUP_FILTERS,
        "advantage_estimator": ADVANTAGE_ESTIMATORS,
        "policy_loss": POLICY_LOSSES,
        "token_filter": TOKEN_FILTERS,
        "mismatch_correction": MISMATCH_CORRECTIONS,
        "loss_aggregation": LOSS_AGGREGATIONS,
        "kl_estimator": KL_ESTIMATORS,
        "collapse_detector": COLLAPSE_DETECTORS,
        "token_statistic": TOKEN_STATS,
        "dataset_adapter": DATASET_ADAPTERS,
    }


def check_registered(kind: str, name: str) -> str:
    """Return ``name`` if registered under ``kind``; else raise ValueError with a suggestion."""
    registry = registries()[kind]
    if name not in registry:
        raise ValueError(registry.unknown_name_message(name))
    return name


class Registered:
    """`Annotated[str, Registered("reward")]`: a field naming a registered part. Checked at load time
    with a "did you mean"; the JSON schema and the recipe reference list the registry's names at
    the moment they are generated, so a plugin's parts show up there too."""

    def __init__(self, kind: str, *, validate: bool = True) -> None:
        self.kind = kind  # a key of `registries()`
        self.validate = validate  # False: the section checks the name itself (e.g. with the kwargs)

    def names(self) -> list[str]:
        return registries()[self.kind].names()

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
