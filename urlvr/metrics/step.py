"""The metrics of one training step, reduced over ranks: what `grpo_step` logs.

Each rank measures its own groups (whole groups: rollout, rewards and advantages never split a
group across ranks) and the update's micro-batches it ran; `reduce_over_ranks` combines them so
every logged value is that of the global batch whatever the world size: a mean over samples,
groups or micro-batches weighted by each rank's count, a token mean by each rank's tokens, an
extreme by the max/min over ranks. The label metrics and p_maj gather the small `[B, G]` and
`[B]` tensors instead, since they need every sample (std, zero-variance groups, Eq. 39-40).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from urlvr.algorithms.mismatch import MismatchWeights
from urlvr.data.records import PromptRecord
from urlvr.dist import all_gather_rows, all_reduce_max, all_reduce_sum
from urlvr.metrics import dynamics
from urlvr.rewards.base import RewardContext, RewardFamily
from urlvr.rewards.compose import BatchRewards
from urlvr.rollout.base import Group

Logs = list[tuple[dict[str, float], int]]  # (metrics, weight) per micro-batch (its real tokens) or optimizer step (1)


def rank_metrics(groups: Sequence[Group], contexts: Sequence[RewardContext], rewards: BatchRewards, mask: torch.Tensor,
                 update_logs: Logs, timings: Mapping[str, float], correction: MismatchWeights | None, *,
                 ngram: int) -> tuple[dict[str, float], dict[str, int]]:
    """(this rank's values, what each is a mean over) for `reduce_over_ranks`: response and
    reward-term metrics of its groups, the update's logs, the stage timings and the mismatch
    correction's sequence means. `mask`: its groups' `[B*G, T]` response mask."""
    responses = dynamics.response_metrics(groups, ngram=ngram)
    term_metrics, term_counts = reward_term_metrics(rewards, len(groups))
    update, update_counts = mean_logs(update_logs)
    answers = [ctx.answers for ctx in contexts]
    local = {
        **responses, **term_metrics,
        "dynamics/answer_rate": sum(a is not None for group in answers for a in group) / mask.shape[0],
        **update, **timings,
        # computed over the whole batch, the same on every rank: the plain mean over ranks is that value
        **(correction.sequence_means if correction is not None else {}),
    }
    sample_means = [k for k in responses if not k.endswith(("_max", "_min"))] + ["dynamics/answer_rate"]
    return local, {**dict.fromkeys(sample_means, mask.shape[0]), **term_counts, **update_counts}


def token_metrics(stats: Mapping[str, torch.Tensor], sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                  metric_stats: Sequence[str], correction: MismatchWeights | None,
                  ref_logprobs: torch.Tensor | None) -> tuple[dict[str, float], dict[str, float]]:
    """(token means, extremes) of this rank's rows (`[b, T]` each; `stats` holds `logprob` and
    `metric_stats`): `actor/<stat>_mean`, the sampler mismatch, the correction's token means and,
    with `ref_logprobs`, KL(pi || pi_0) of the policy that sampled the batch."""
    logprob = stats["logprob"]
    mismatch = torch.where(mask.bool(), (logprob - sampler_logprobs).abs(), 0.0)
    means = {  # ranks hold different token counts: `reduce_over_ranks` weights each rank's mean by its count
        **{f"actor/{name}_mean": dynamics.masked_mean(stats[name], mask) for name in metric_stats},
        **dynamics.sampler_mismatch_metrics(logprob, sampler_logprobs, mask),
        **(correction.token_means if correction is not None else {}),  # whole batch: any token weighting gives it
    }
    if ref_logprobs is not None:
        means["actor/kl_to_initial"] = dynamics.masked_mean(dynamics.kl_k3(logprob, ref_logprobs), mask)
    return means, {"rollout/logprob_mismatch_max": float(mismatch.max()) if mismatch.numel() else 0.0}


def global_label_metrics(rewards: BatchRewards, contexts: Sequence[RewardContext], records: Sequence[PromptRecord],
                         *, oracle_named: bool, family: RewardFamily, verdict_key: str | None,
                         ) -> tuple[dict[str, float], torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(label, reward and p_maj metrics over the global batch, this rank's p_maj `[B]`, majority
    correctness `[B]` and oracle `[B, G]`). Each label metric only where the reward's family
    defines it (Reward Accuracy: verdicts only, read from the term `verdict_key`)."""
    answers, voters = [ctx.answers for ctx in contexts], [ctx.voters for ctx in contexts]
    oracle = rewards.oracle
    if oracle is None and oracle_named:  # no label on this rank: NaN rows, same shapes
        oracle = torch.full(rewards.total.shape, float("nan"))
    p_maj = dynamics.majority_ratios(voters)  # [B]
    majority_correct = dynamics.majority_correctness(voters, answers, oracle, [r.label for r in records])  # [B]
    metrics = {"dynamics/majority_ratio": float(all_gather_rows(p_maj).mean())}
    total = all_gather_rows(rewards.total)  # std and zero-variance groups need every sample: gather [B, G] once
    judged = total if verdict_key is None else all_gather_rows(rewards.per_term[verdict_key])
    metrics.update(dynamics.label_metrics(
        judged, None if oracle is None else all_gather_rows(oracle), all_gather_rows(majority_correct), family=family))
    metrics.update(dynamics.reward_metrics(total, {name: all_gather_rows(s) for name, s in rewards.per_term.items()}))
    return metrics, p_maj, majority_correct, oracle


def reward_term_metrics(rewards: BatchRewards, num_groups: int) -> tuple[dict[str, float], dict[str, int]]:
    """Per-term error rates (on_error: zero) and the means of the terms' diagnostics, with what
    each is a mean over (groups, finite values); timed terms' timeouts, summed over ranks here."""
    out = {f"reward/{key}/error_rate": rate for key, rate in rewards.errors.items()}
    counts = dict.fromkeys(out, num_groups)
    if rewards.timeouts:  # the same keys on every rank (BatchRewards.timeouts), so the same collective
        timeouts = all_reduce_sum(torch.tensor([float(n) for n in rewards.timeouts.values()], dtype=torch.float64))
        out.update({f"reward/{key}_timeouts": float(n) for key, n in zip(rewards.timeouts, timeouts)})
    for key, values in rewards.diagnostics.items():
        finite = values[torch.isfinite(values)]
        out[f"reward/{key}_mean"] = float(finite.mean()) if finite.numel() else 0.0
        counts[f"reward/{key}_mean"] = finite.numel()
    return out, counts


def mean_logs(logs: Logs) -> tuple[dict[str, float], dict[str, int]]:
    """Per key, over the logs of positive weight that have it: `*_max` the max, `*_min` the min,
    any other key the weighted mean (0.0 if none) with its total weight as count. A micro-batch's
    weight is its real tokens, so a token mean (`actor/ratio_mean`, `actor/clip_fraction`) and
    an extreme come out the same however the micro-batches are cut; a step entry weighs 1.
    Extremes get no count: `reduce_over_ranks` then takes their max/min over ranks too."""
    keys = {k for log, _ in logs for k in log}
    means, counts = {}, {}
    for key in keys:
        present = [(log[key], weight) for log, weight in logs if key in log and weight > 0]
        if key.endswith("_max"):
            means[key] = max((value for value, _ in present), default=0.0)
        elif key.endswith("_min"):
            means[key] = min((value for value, _ in present), default=0.0)
        else:
            counts[key] = sum(weight for _, weight in present)
            means[key] = sum(value * weight for value, weight in present) / max(1, counts[key])
    return means, counts


def reduce_over_ranks(local: dict[str, float], counts: dict[str, int], token_means: dict[str, float],
                      tokens: float) -> dict[str, float]:
    """A key of `local` with a count is a mean over that many of this rank's items (samples,
    groups, micro-batches: ranks hold unequal shares), so the ranks' values are weighted by their
    counts; without a count, `*_max` keys take the max over ranks, `*_min` keys the min, and the
    rest (timings) the plain mean. `token_means` are weighted by each rank's `tokens`. Keys
    present on all ranks. Adds `perf/response_tokens`."""
    keys, weighted = sorted(local), sorted(token_means)
    count = torch.tensor([float(counts.get(k, 1)) for k in keys], dtype=torch.float64)  # 1: each rank the same
    total = all_reduce_sum(count)
    share = torch.where(total > 0, count / total.clamp(min=1e-300), 0.0)  # this rank's weight: 1.0 in a world of one
    raw = torch.tensor([local[k] for k in keys], dtype=torch.float64)
    values = torch.cat([torch.where(count > 0, raw * share, 0.0),
                        torch.tensor([token_means[k] * tokens for k in weighted] + [tokens], dtype=torch.float64)])
    sums, maxima, minima = all_reduce_sum(values), all_reduce_max(raw), -all_reduce_max(-raw)
    out = {k: float(sums[i] if k in counts or not k.endswith(("_max", "_min"))
                    else maxima[i] if k.endswith("_max") else minima[i]) for i, k in enumerate(keys)}
    total_tokens = float(sums[-1])
    out.update({k: float(sums[len(keys) + j]) / total_tokens if total_tokens else 0.0 for j, k in enumerate(weighted)})
    out["perf/response_tokens"] = total_tokens
    return out
