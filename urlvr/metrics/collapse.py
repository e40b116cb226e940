"""Collapse: the Model Collapse Step (paper §6) and label-free early warnings.

Intrinsic rewards rise, then fall: the policy sharpens onto its own majority/most-confident
answers, and once those are wrong it keeps sharpening anyway. Two ways to see it coming:

  * **Model Collapse Step** (needs labels): the first step at which Reward Accuracy (App. B.2,
    Eq. 40) falls below a threshold (paper: 1%), optionally on a trailing moving average. Reward
    Accuracy is defined for verdict rewards (majority vote: the paper's case); for certainty
    rewards the step watches their Label Accuracy instead, that of the top-reward sample (Eq. 43):
    collapsed = the sample the reward prefers is (almost) never right. Rewards of neither family
    have no collapse step (`COLLAPSE_METRICS`; docs/dynamics.md).
  * **Detectors** (no labels): a registry of named rules over one logged metric each -- proxy
    reward saturating near 1, entropy or response length collapsing relative to their start,
    repetition growing, KL to the initial policy drifting. A recipe lists the ones it wants with
    thresholds (`collapse.detectors`); users register their own `Detector`.

`CollapseMonitor` is what the trainer holds: it is fed each step's metrics, reports new alarms
(each detector fires once), and remembers which checkpoint was best. Its state is plain JSON,
saved in checkpoints so that a resumed run judges exactly like an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from urlvr.registry import Registry

REWARD_ACCURACY = "dynamics/reward_accuracy"
TOP_REWARD_LABEL_ACCURACY = "dynamics/top_reward_label_accuracy"
# what the Model Collapse Step watches: the first of these a step logs (the loop logs only the
# one defined for the reward's family: verdict -> Reward Accuracy, certainty -> Eq. 43)
COLLAPSE_METRICS = (REWARD_ACCURACY, TOP_REWARD_LABEL_ACCURACY)


def collapse_metric(metrics: Mapping[str, Any]) -> str | None:
    """The Model Collapse Step's metric among a step's metrics, or None when none is logged."""
    return next((name for name in COLLAPSE_METRICS if metrics.get(name) is not None), None)


def trailing_mean(values: Sequence[float], window: int) -> float:
    """Mean of the last `window` values (fewer at the start)."""
    tail = values[-window:]
    return sum(tail) / len(tail)


def model_collapse_step(
    steps: Sequence[int], reward_accuracy: Sequence[float | None], *, threshold: float = 0.01, window: int = 1,
) -> int | None:
    """MCS = min{ t : mean(RA over the last `window` measured steps up to t) < threshold }, or None.

    Steps whose Reward Accuracy is missing (no labelled prompt in the batch) are skipped, not
    read as 0. window = 1 is the paper's definition. For a certainty reward pass its top-reward
    Label Accuracy (Eq. 43) as `reward_accuracy` (`collapse_metric` says which a run logged).
    """
    measured: list[float] = []
    for step, value in zip(steps, reward_accuracy, strict=True):
        if value is None:
            continue
        measured.append(value)
        if trailing_mean(measured, window) < threshold:
            return step
    return None


# --------------------------------------------------------------------------- detectors
@dataclass(frozen=True)
class Detector:
    """A label-free rule on one metric: fire when its trailing mean over `window` steps passes a
    limit -- `threshold` itself, or (relative=True) `threshold` x the baseline, the mean of the
    first `window` values. Needs `window` values (2 x window when relative) before it can fire."""

    name: str
    metric: str
    direction: Literal["above", "below"]
    relative: bool
    default_threshold: float
    description: str
    stats: tuple[str, ...] = ()  # token statistics whose `actor/<stat>_mean` it watches (the step then computes them)

    def check(self, values: Sequence[float], *, threshold: float | None = None, window: int = 5) -> tuple[float, float] | None:
        """(current, limit) when the rule fires on this history, else None."""
        threshold = self.default_threshold if threshold is None else threshold
        if len(values) < (2 * window if self.relative else window):
            return None
        current = trailing_mean(values, window)
        if self.relative:
            baseline = sum(values[:window]) / window
            if baseline <= 0:
                return None  # nothing to collapse from
            limit = threshold * baseline
        else:
            limit = threshold
        fired = current > limit if self.direction == "above" else current < limit
        return (current, limit) if fired else None


COLLAPSE_DETECTORS: Registry[Detector] = Registry("collapse detector")


def register_detector(detector: Detector) -> Detector:
    COLLAPSE_DETECTORS.register(detector.name)(detector)
    return detector


for _detector in (
    Detector("proxy_saturation", "reward/proxy_mean", "above", False, 0.95,
             "proxy reward saturates near 1: the group agrees with itself (ensemble rewards in [0, 1])"),
    Detector("entropy_collapse", "actor/entropy_mean", "below", True, 0.1,
             "actor entropy falls below threshold x its starting value", stats=("entropy",)),
    Detector("length_collapse", "response/length_mean", "below", True, 0.5,
             "mean response length falls below threshold x its start (the Probability reward's failure)"),
    Detector("repetition_growth", "response/repetition_rate", "above", False, 0.5,
             "share of repeated n-grams in responses exceeds threshold (entropy rewards' failure)"),
    Detector("kl_drift", "actor/kl_to_initial", "above", False, 0.1,
             "KL to the initial policy exceeds threshold (needs dynamics.kl_to_initial_every or a KL penalty)"),
):
    register_detector(_detector)


# --------------------------------------------------------------------------- the monitor
@dataclass(frozen=True)
class Alarm:
    step: int
    detector: str  # a detector's name, or "model_collapse" for the Model Collapse Step
    metric: str
    value: float
    limit: float

    @property
    def message(self) -> str:
        relation = "<" if self.value < self.limit else ">"
        return f"step {self.step}: {self.detector}: {self.metric} = {self.value:.4g} {relation} {self.limit:.4g}"


class CollapseMonitor:
    """Feeds on each step's metrics; reports new alarms; tracks the best checkpoint."""

    def __init__(self, section: Any, state: Mapping[str, Any] | None = None) -> None:
        self.section = section  # a recipe CollapseSection
        self.detectors = [(COLLAPSE_DETECTORS.get(d.name), d) for d in section.detectors]
        state = dict(state or {})
        self.series: dict[str, list[float]] = {k: list(v) for k, v in state.get("series", {}).items()}
        self.alarms: list[Alarm] = [Alarm(**a) for a in state.get("alarms", [])]
        self.collapse_step: int | None = state.get("collapse_step")
        self.collapse_metric: str | None = state.get("collapse_metric")  # what the collapse step watches
        self.latest: dict[str, float] = dict(state.get("latest", {}))  # last value of every metric seen
        self.checkpoints: dict[int, float | None] = {int(k): v for k, v in state.get("checkpoints", {}).items()}

    def observe(self, step: int, metrics: Mapping[str, float]) -> list[Alarm]:
        """Record one step's metrics; return the alarms that fire for the first time now."""
        self.latest.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        new: list[Alarm] = []
        watched = collapse_metric(metrics)
        if watched is not None:
            self.collapse_metric = watched
            series = self.series.setdefault("model_collapse", [])  # apart from detector series
            series.append(float(metrics[watched]))
            value = trailing_mean(series, self.section.smoothing_window)
            if self.collapse_step is None and value < self.section.reward_accuracy_threshold:
                self.collapse_step = step
                new.append(Alarm(step, "model_collapse", watched, value, self.section.reward_accuracy_threshold))
        for metric in {detector.metric for detector, _ in self.detectors} & set(metrics):
            self.series.setdefault(metric, []).append(float(metrics[metric]))
        fired = {a.detector for a in self.alarms}
        for detector, spec in self.detectors:
            if detector.name in fired or detector.metric not in metrics:
                continue
            hit = detector.check(self.series[detector.metric], threshold=spec.threshold, window=spec.window)
            if hit is not None:
                new.append(Alarm(step, detector.name, detector.metric, *hit))
        self.alarms.extend(new)
        return new

    def observe_eval(self, metrics: Mapping[str, float]) -> None:
        """Evaluation scores count as the latest value of their keys (for `best_metric`)."""
        self.latest.update(metrics)

    def record_checkpoint(self, step: int) -> None:
        """Note the best-metric value the checkpoint of `step` was saved with."""
        metric = self.section.best_metric
        self.checkpoints[step] = None if metric is None else self.latest.get(metric)

    def best_checkpoint_step(self) -> int | None:
        """By `best_metric` (max or min, earliest on ties), else the last checkpoint saved before
        the first alarm (the last state known to be healthy)."""
        if self.section.best_metric is None:
            first_alarm = min((a.step for a in self.alarms), default=None)
            healthy = [s for s in self.checkpoints if first_alarm is None or s < first_alarm]
            return max(healthy, default=None)
        scored = [(v, s) for s, v in self.checkpoints.items() if v is not None]
        if not scored:
            return None
        sign = 1 if self.section.best_mode == "max" else -1
        return max(scored, key=lambda vs: (sign * vs[0], -vs[1]))[1]

    def state_dict(self) -> dict[str, Any]:
        return {"series": self.series, "alarms": [asdict(a) for a in self.alarms], "collapse_step": self.collapse_step,
                "collapse_metric": self.collapse_metric,
                "latest": self.latest, "checkpoints": {str(k): v for k, v in self.checkpoints.items()}}

    def summary(self) -> dict[str, Any]:
        return {"model_collapse_step": self.collapse_step, "model_collapse_metric": self.collapse_metric,
                "reward_accuracy_threshold": self.section.reward_accuracy_threshold,
                "alarms": [{**asdict(a), "message": a.message} for a in self.alarms]}
