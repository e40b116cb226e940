"""Training-dynamics metrics of one rollout batch (paper App. B.2), as pure functions.

Two kinds of inputs: per-sample tensors `[B, G]` (proxy reward, oracle reward) and per-prompt
tensors `[B]` (majority ratio, majority correctness) that the loop computes on each rank and
gathers, so every metric is exact over the global batch whatever the world size.

Labels are optional. The oracle tensor holds NaN rows for prompts without a label; metrics that
need labels are computed over the labelled prompts only, and are *absent* (not zero) when no
prompt of the batch has one. A sample is "correct" when its oracle reward exceeds 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from urlvr.rewards.extractors import normalize_answer
from urlvr.rollout.base import Group
from urlvr.algorithms.advantages import constant_groups
from urlvr.algorithms.voting import majority_answer, majority_ratios  # noqa: F401  (dynamics.majority_ratios: the loop's p_maj)
from urlvr.algorithms.losses import kl_k3  # noqa: F401  (one k3, the loss's; also used as dynamics.kl_k3)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """sum(values * mask) / sum(mask), 0.0 for an empty mask."""
    total = mask.sum()
    return float((values * mask).sum() / total) if total > 0 else 0.0


def sampler_mismatch_metrics(
    trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
) -> dict[str, float]:
    """Sampler vs trainer log-probs of the sampled tokens: mean |difference| and KL(sampler || trainer)
    by k3. Token means over ``mask``; [B, T] x3 -> floats. A vLLM sampler differs from the trainer by
    kernels and precision; the transformers engine only by float noise. A correction
    (``algorithm.mismatch``) logs its own weights' statistics."""
    real = mask.bool()  # zero both on padding, so the padding's difference is 0, not garbage
    trainer = torch.where(real, trainer_logprobs, 0.0).double()
    sampler = torch.where(real, sampler_logprobs, 0.0).double()
    diff = trainer - sampler
    return {
        "rollout/logprob_mismatch_mean": masked_mean(diff.abs(), mask),
        "rollout/mismatch_kl": masked_mean(kl_k3(sampler, trainer), mask),  # KL(sampler || trainer): samples from the sampler
    }


# --------------------------------------------------------------------------- responses
def repetition_rate(token_ids: Sequence[int], ngram: int) -> float:
    """seq-rep-n = 1 - |unique n-grams| / |n-grams| (Welleck et al. 2019); 0 below n tokens."""
    grams = [tuple(token_ids[i : i + ngram]) for i in range(len(token_ids) - ngram + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def response_metrics(groups: Sequence[Group], *, ngram: int = 4) -> dict[str, float]:
    """Length mean/max, truncation rate (finish reason `length`) and mean repetition rate."""
    samples = [s for g in groups for s in g.samples]
    lengths = torch.tensor([len(s.token_ids) for s in samples], dtype=torch.float64)
    return {
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/truncation_rate": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "response/repetition_rate": sum(repetition_rate(s.token_ids, ngram) for s in samples) / len(samples),
    }


# --------------------------------------------------------------------------- proxy reward
def reward_metrics(total: torch.Tensor, per_term: dict[str, torch.Tensor]) -> dict[str, float]:
    """Proxy reward statistics; total is [B, G]."""
    metrics = {
        "reward/proxy_mean": float(total.mean()),
        "reward/proxy_std": float(total.std(unbiased=False)),
        "reward/zero_variance_group_fraction": float(constant_groups(total).float().mean()),
    }
    for name, scores in per_term.items():
        metrics[f"reward/{name}_mean"] = float(scores.mean())
    return metrics


# --------------------------------------------------------------------------- per prompt
def majority_correctness(
    voters: Sequence[Sequence[str | None]], answers: Sequence[Sequence[str | None]],
    oracle: torch.Tensor | None, labels: Sequence[str | None],
) -> torch.Tensor:
    """1[maj(x) is correct] per prompt (Eq. 39's indicator), NaN where the prompt has no label.  -> [B]

    "Correct" follows the oracle: the majority answer is right when a trained sample giving it
    scored > 0.5 (so a math-verify oracle's equivalences count). A majority answer that only the
    extra voting samples gave falls back to string equality with the normalised label; no
    majority (nobody answered) is wrong.
    """
    out = []
    for i, (group_voters, group_answers, label) in enumerate(zip(voters, answers, labels, strict=True)):
        if label is None or oracle is None or torch.isnan(oracle[i]).any():
            out.append(float("nan"))
            continue
        majority = majority_answer(group_voters)
        rows = [j for j, a in enumerate(group_answers) if majority is not None and a == majority]
        if rows:
            out.append(float(oracle[i, rows[0]] > 0.5))
        else:
            out.append(float(majority is not None and majority == normalize_answer(label)))
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------- label metrics
def point_biserial(scores: torch.Tensor, correct: torch.Tensor) -> float | None:
    """r_pb = (M1 - M0) / s * sqrt(n1 n0 / n^2): Pearson correlation of a score with a 0/1
    outcome (s: population std of the scores). None when undefined (constant score or outcome)."""
    scores, correct = scores.double().flatten(), correct.double().flatten()
    n1, n = float(correct.sum()), correct.numel()
    spread = float(scores.std(unbiased=False)) if n else 0.0
    if n1 == 0 or n1 == n or spread == 0.0:
        return None
    m1, m0 = float(scores[correct > 0].mean()), float(scores[correct == 0].mean())
    return (m1 - m0) / spread * ((n1 * (n - n1)) ** 0.5 / n)


def label_metrics(
    proxy: torch.Tensor, oracle: torch.Tensor | None, majority_correct: torch.Tensor, *, family: str,
) -> dict[str, float]:
    """The label-based metrics of App. B.2 over the prompts that have a label (empty when none),
    each only for the reward family it is defined for (`urlvr.rewards.base.RewardFamily`):

    every family:
      ground_truth_mean  = mean r_gt                                              (Eq. 41)
      label_accuracy     = mean_i 1[maj(x_i) = a*_i]                              (Eq. 39)
    family "verdict" (proxy = the verdict term's scores, > 0.5 = judged correct):
      reward_accuracy    = mean_ij 1[(r_ij > 0.5) = r_gt_ij]                      (Eq. 40)
    family "certainty" (proxy = the training reward):
      top_reward_label_accuracy = mean_i r_gt(y_i,j*), j* = argmax_j r_ij         (Eq. 43; ties: first)
      reward_correctness_corr   = point-biserial r of r_ij with r_gt_ij, pooled (absent if undefined)

    A certainty score has no threshold, so Eq. 40 on it would only count the wrong samples (an
    entropy reward is always < 0.5); a verdict is flat within its two values, so its argmax is
    just the first sample the verdict accepts.

    proxy, oracle: [B, G] (oracle NaN rows = unlabelled); majority_correct: [B].
    """
    if oracle is None:
        return {}
    labelled = ~torch.isnan(oracle).any(dim=1)  # [B]
    if not bool(labelled.any()):
        return {}
    correct = (oracle[labelled] > 0.5).double()  # [M, G]
    scores = proxy[labelled].double()  # [M, G]
    metrics = {
        "reward/ground_truth_mean": float(oracle[labelled].double().mean()),
        "dynamics/label_accuracy": float(majority_correct[labelled].mean()),
        "dynamics/labelled_prompts": float(labelled.sum()),
    }
    if family == "verdict":
        metrics["dynamics/reward_accuracy"] = float(((scores > 0.5).double() == correct).double().mean())
    elif family == "certainty":
        top = scores.argmax(dim=1, keepdim=True)  # [M, 1] first maximum
        metrics["dynamics/top_reward_label_accuracy"] = float(correct.gather(1, top).mean())
        corr = point_biserial(scores, correct)
        if corr is not None:
            metrics["dynamics/reward_correctness_corr"] = corr
    return metrics
