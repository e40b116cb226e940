"""Length shaping: DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", arXiv:2503.14476, Eq. 13).

    R_length(y) = 0                               if |y| <= L_max - L_cache
                  ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                  -1                              if |y| > L_max

A term added to the task reward (`reward.terms`, weight 1 in the paper): a response that runs into
the last `cache` tokens before the cap loses up to 1, linearly, so the policy learns to finish
before truncation without the cliff of "truncated = wrong". |y| is the number of response tokens
the sampler produced (the count `rollout.max_new_tokens` caps, an end-of-sequence token included).

`max_length` is required: a reward sees its kwargs only, not the rollout's settings. Set it to
`rollout.max_new_tokens` (DAPO: L_max = 20480 generated tokens, L_cache = 4096, so the penalty
starts at 16384); a truncated response then scores exactly -1. A `max_length` above the cap only
moves the ramp out of reach; below it, responses longer than `max_length` score -1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from urlvr.rewards.base import RewardContext, reward
from urlvr.rollout.base import Group


def overlong_penalty_scores(lengths: Sequence[int], *, max_length: int, cache: int) -> list[float]:
    """R_length(|y|) of DAPO Eq. 13 per response length: 0, then a linear ramp to -1 over the last
    `cache` tokens before `max_length`, -1 beyond it."""
    expected = max_length - cache  # the longest response that is never punished
    return [0.0 if n <= expected else (expected - n) / cache if n <= max_length else -1.0 for n in lengths]


@reward("overlong_penalty")
def overlong_penalty(group: Group, ctx: RewardContext, *, max_length: int | None = None, cache: int = 4096) -> list[float]:
    """R = 0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache up to L_max; -1 beyond (DAPO Eq. 13).

    `max_length`: L_max in tokens, normally `rollout.max_new_tokens` (required: there is no default).
    `cache`: L_cache, the length of the ramp before L_max, in tokens, in (0, max_length].
    """
    _check(max_length=max_length, cache=cache)
    return overlong_penalty_scores([len(s.token_ids) for s in group.samples], max_length=max_length, cache=cache)


def _check(*, max_length: int | None = None, cache: int = 4096, **_: Any) -> None:
    """Load-time validation: `max_length` given (= rollout.max_new_tokens, normally), 0 < cache <= max_length."""
    if max_length is None:
        raise ValueError("overlong_penalty needs max_length (L_max, normally rollout.max_new_tokens): "
                         "write `kwargs: {max_length: 20480, cache: 4096}`")
    if not 0 < cache <= max_length:
        raise ValueError(f"overlong_penalty: cache must lie in (0, max_length={max_length}], got {cache}")


def check_rollout(*, max_new_tokens: int, max_length: int | None = None, cache: int = 4096, **_: Any) -> None:
    """Load-time: a response is at most `rollout.max_new_tokens` long; if that is within the ramp's
    start (max_length - cache), every response scores 0 and the reward does nothing."""
    if max_length is not None and max_new_tokens <= max_length - cache:
        raise ValueError(f"overlong_penalty: responses stop at rollout.max_new_tokens ({max_new_tokens}), within "
                         f"max_length - cache ({max_length} - {cache} = {max_length - cache}): every response scores "
                         f"0, so the reward does nothing; set max_length to rollout.max_new_tokens and cache below it")


overlong_penalty.check = _check  # type: ignore[attr-defined]
overlong_penalty.check_rollout = check_rollout  # type: ignore[attr-defined]
