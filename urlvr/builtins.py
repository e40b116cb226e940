"""Importing this module registers every built-in part (explicit imports, no magic discovery)."""

import urlvr.data.loaders  # noqa: F401
import urlvr.metrics.collapse  # noqa: F401
import urlvr.metrics.loggers  # noqa: F401
import urlvr.rewards.certainty  # noqa: F401
import urlvr.rewards.co_reward  # noqa: F401
import urlvr.rewards.countdown  # noqa: F401
import urlvr.rewards.cuma  # noqa: F401
import urlvr.rewards.ensemble  # noqa: F401
import urlvr.rewards.evol_rl  # noqa: F401  (wordllama is imported on first use)
import urlvr.rewards.external  # noqa: F401
import urlvr.rewards.extractors  # noqa: F401
import urlvr.rewards.length  # noqa: F401
import urlvr.rewards.math_verify  # noqa: F401
import urlvr.rewards.scope  # noqa: F401
import urlvr.rewards.reasoning_gym  # noqa: F401  (reasoning-gym itself is imported on first use)
import urlvr.rewards.self_verification  # noqa: F401
import urlvr.rewards.unified  # noqa: F401
import urlvr.rewards.voting  # noqa: F401
import urlvr.rollout.transformers_engine  # noqa: F401
import urlvr.rollout.vllm_engine  # noqa: F401  (imports vLLM only when an engine is built)
import urlvr.rollout.server_engine  # noqa: F401
import urlvr.algorithms.advantages  # noqa: F401
import urlvr.algorithms.advantage_shaping  # noqa: F401
import urlvr.algorithms.losses  # noqa: F401
import urlvr.algorithms.policy_losses  # noqa: F401
import urlvr.algorithms.gspo  # noqa: F401
import urlvr.algorithms.cispo  # noqa: F401
import urlvr.algorithms.token_filters  # noqa: F401
import urlvr.algorithms.mismatch  # noqa: F401
import urlvr.algorithms.group_filters  # noqa: F401
