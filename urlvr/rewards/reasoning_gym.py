"""reasoning-gym's verifiers as a reward (the `reasoning-gym` extra; prompts from `kind: reasoning_gym`).

    r(y) = score_answer_task(ans(y), entry)  in [0, 1]; 0 when no answer was extracted

Each task scores with its own verifier (Countdown checks the expression uses the numbers and
reaches the target, arithmetic compares values, ...). The verifier reads the reference answer,
so the reward is registered as an oracle (`needs_label=True`): it enters the training signal
only when a recipe names it, like `ground_truth` (supervised RLVR on reasoning-gym tasks), and it
can be `reward.oracle` or `eval.judge`.
"""

from __future__ import annotations

from functools import lru_cache

from urlvr.rewards.base import RewardContext, reward
from urlvr.rollout.base import Group


@lru_cache(maxsize=None)
def _verifier(task: str):
    import reasoning_gym  # optional extra, loaded on demand: a reasoning_gym reward is called

    return reasoning_gym.get_score_answer_fn(task)


@reward("reasoning_gym", needs_label=True)
def reasoning_gym_reward(group: Group, ctx: RewardContext) -> list[float]:
    """reasoning-gym: r(y) = the task's own score_answer(ans(y), entry) in [0, 1]; no answer scores 0."""
    task = ctx.metadata.get("reasoning_gym_task")
    if task is None:
        raise ValueError("the reasoning_gym reward needs prompts from `data.source.kind: reasoning_gym`")
    score = _verifier(task)
    entry = {"question": ctx.question, "answer": ctx.label, "metadata": ctx.metadata.get("reasoning_gym_metadata", {})}
    out = []
    for answer in ctx.answers:
        try:
            value = 0.0 if answer is None else float(score(answer, entry))
        except Exception:  # a verifier tripping on odd model text scores it wrong, never stops the run
            value = 0.0
        out.append(min(1.0, max(0.0, value)))
    return out
