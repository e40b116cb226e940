"""Importing this module registers every built-in part (explicit imports, no magic discovery)."""

import urlvr.rewards.external  # noqa: F401
import urlvr.rewards.extractors  # noqa: F401
import urlvr.rewards.voting  # noqa: F401
import urlvr.rollout.transformers_engine  # noqa: F401
import urlvr.trainer.advantages  # noqa: F401
import urlvr.trainer.losses  # noqa: F401
