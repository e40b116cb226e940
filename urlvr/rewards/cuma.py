"""CuMa's masked majority vote (Roy et al. 2025, "You Need Reasoning to Learn Reasoning: The
Limitations of Label-Free RL in Weak Base Models", arXiv:2511.04902; code BorealisAI/CuMa).

CuMa is TTRL's majority vote with two changes for weak base models: groups without a majority
answer are masked, so a small model's scattered guesses do not become pseudo-labels, and the
prompts come in a difficulty curriculum, easy first. The mask is this reward; the curriculum is
a data order (docs/rewards.md, "CuMa": a dataset sorted by difficulty with `data.shuffle: false`;
staged re-sorting by the model's own difficulty is not built).

Reading of "no majority" (the paper's method section and its code could not be read from this
session; only its abstract: "mask no-majority rollouts"): a group has a majority when its most
frequent answer holds MORE than `majority_share` (default 1/2, a strict majority) of the voters,
where voters without an answer count in the denominator (so a group where most samples never
answer is masked too) and abstain from the vote. Masked = every sample scores 0: under every
advantage estimator in urlvr such a constant group gets exactly 0 advantage, so it adds no
gradient (its tokens still count in a token-mean loss normaliser, where a loss mask would drop
them: a scale difference, not a direction one).
"""

from __future__ import annotations

from collections import Counter

from urlvr.rewards.base import RewardContext, RewardOutput, reward
from urlvr.rollout.base import Group


def top_answer_share(voters: tuple[str | None, ...]) -> tuple[str | None, float]:
    """(the most frequent answer, its count / |voters|); (None, 0.0) when nobody answered.

    Answerless voters abstain but count in |voters|. Equal counts go to the answer seen first;
    under a strict majority (share > 1/2) two answers can never tie, so the rule never decides."""
    counts = Counter(a for a in voters if a is not None)
    if not counts:
        return None, 0.0
    answer, count = counts.most_common(1)[0]
    return answer, count / len(voters)


@reward("cuma", family="verdict")
def cuma(group: Group, ctx: RewardContext, *, majority_share: float = 0.5) -> RewardOutput:
    """CuMa: r(y_i) = 1[ans(y_i) = maj(x)] · 1[c(maj)/|V| > s], s = 1/2 (arXiv 2511.04902, abstract: "mask no-majority rollouts").

    maj(x) the most frequent answer among the voters V (`ctx.voters`: the trained samples, plus
    the extra voting samples when `reward.vote_group_size` is set), c(maj) its count; voters
    without an answer abstain from the vote but count in |V|. A group whose top answer holds no
    more than `majority_share` of the voters is masked: every sample scores 0, so its advantage
    is exactly 0 (no gradient). With the mask never firing this is `majority_vote`.

    `majority_share`: the share of the voters the top answer must exceed, in [0.5, 1); 0.5 (a
    strict majority) is our reading of the paper's "no-majority" (its code was not read).
    Diagnostics: `masked` (1 when the group was masked), `majority_ratio` (the top answer's share).
    """
    _check_share(majority_share)
    voters = ctx.voters
    answer, share = top_answer_share(voters)
    masked = answer is None or not share > majority_share
    scores = [0.0 if masked else float(a is not None and a == answer) for a in ctx.answers]
    n = len(scores)
    return RewardOutput(scores=scores, diagnostics={"masked": [float(masked)] * n, "majority_ratio": [share] * n})


def _check_share(majority_share: float = 0.5) -> None:
    if not 0.5 <= majority_share < 1.0:
        raise ValueError(f"cuma: majority_share must lie in [0.5, 1) (a majority is more than half the voters; "
                         f"1 would mask every group), got {majority_share}")


cuma.check = _check_share  # refused at recipe load, not at step 1
