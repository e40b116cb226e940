"""Load-time checks of registered names: a recipe naming an unknown part fails before step 1."""

from __future__ import annotations

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
    from urlvr.algorithms.losses import KL_ESTIMATORS, LOSS_AGGREGATIONS
    from urlvr.algorithms.policy_losses import POLICY_LOSSES
    from urlvr.algorithms.token_stats import TOKEN_STATS

    return {
        "reward": REWARDS,
        "extractor": EXTRACTORS,
        "rollout_engine": ROLLOUT_ENGINES,
        "advantage_estimator": ADVANTAGE_ESTIMATORS,
        "policy_loss": POLICY_LOSSES,
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
