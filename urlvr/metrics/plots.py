"""`urlvr plot RUN_DIR [RUN_DIR...]`: PNG figures of the rise-then-fall dynamics.

`dynamics.png` has one panel per group of metrics that any of the runs logged (proxy vs
ground-truth reward, reward/label accuracy, entropy, length, repetition, KL, evaluation); runs
are overlaid in their own colour, and each run's Model Collapse Step is a dashed vertical line in
that colour. `prompts-<run>.png` is the paper's Fig. 4 for a run with per-prompt tracking: a
heatmap of greedy (else majority) correctness per prompt and step, blue = right, red = wrong,
darker = more confident.

Matplotlib is used through its object API with the Agg canvas: no pyplot state, no display.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from urlvr.metrics.collapse import collapse_metric, model_collapse_step
from urlvr.metrics.loggers import read_jsonl
from urlvr.metrics.tracking import read_prompt_rows

# (panel title, [(metric key, legend label)]) -- a panel appears when any run logged one of its keys
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("Proxy vs ground-truth reward", (("reward/proxy_mean", "proxy"), ("reward/ground_truth_mean", "ground truth"))),
    ("Reward / label accuracy", (("dynamics/reward_accuracy", "reward acc."), ("dynamics/label_accuracy", "label acc."),
                                 ("dynamics/top_reward_label_accuracy", "top-reward acc."),
                                 ("dynamics/majority_ratio", "p_maj"))),
    ("Actor entropy", (("actor/entropy_mean", "entropy"),)),
    ("Response length", (("response/length_mean", "mean length (tokens)"),)),
    ("Repetition / truncation", (("response/repetition_rate", "repeated n-grams"),
                                 ("response/truncation_rate", "truncated responses"))),
    ("KL to initial policy", (("actor/kl_to_initial", "k3"),)),
)
EVAL_PANEL = "Evaluation"
STYLES = ("-", "--", ":", "-.")


@dataclass(frozen=True)
class RunData:
    name: str
    metrics: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    collapse_step: int | None
    prompt_rows: list[dict[str, Any]]


@dataclass(frozen=True)
class Figure:
    path: Path
    panels: tuple[str, ...]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path)


def load_run(run_dir: Path, name: str | None = None) -> RunData:
    """A run directory's metrics, evaluations, collapse step and per-prompt rows."""
    run_dir = Path(run_dir)
    metrics = _jsonl(run_dir / "metrics.jsonl")
    if not metrics:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a urlvr run directory?)")
    summary_path = run_dir / "summary.json"
    if summary_path.is_file() and "model_collapse_step" in (summary := json.loads(summary_path.read_text())):
        collapse = summary["model_collapse_step"]
    else:  # a run still going (or killed): recompute from the log with the run's own settings
        threshold, window = _collapse_settings(run_dir)
        watched = next((name for name in map(collapse_metric, metrics) if name is not None), None)
        collapse = None if watched is None else model_collapse_step(
            [m["step"] for m in metrics], [m.get(watched) for m in metrics], threshold=threshold, window=window)
    return RunData(name or run_dir.name, metrics, _jsonl(run_dir / "eval.jsonl"), collapse, read_prompt_rows(run_dir))


def _collapse_settings(run_dir: Path) -> tuple[float, int]:
    recipe_path = run_dir / "recipe.yaml"
    section = (yaml.safe_load(recipe_path.read_text()) or {}).get("collapse", {}) if recipe_path.is_file() else {}
    return section.get("reward_accuracy_threshold", 0.01), section.get("smoothing_window", 1)


def plot_runs(run_dirs: Sequence[Path], out_dir: Path) -> list[Figure]:
    """Write dynamics.png (all runs overlaid) and prompts-<run>.png (runs with tracking) into out_dir.
    A `prompts-*.png` an earlier plot left there for a run not plotted now is deleted: the folder
    shows this plot's runs only (the figures are cheap to redraw, so replotting is never refused)."""
    names = _unique_names([Path(d) for d in run_dirs])
    runs = [load_run(Path(d), name) for d, name in zip(run_dirs, names, strict=True)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = [plot_dynamics(runs, out_dir / "dynamics.png")]
    for run in runs:
        if run.prompt_rows:
            figures.append(plot_prompt_heatmap(run, out_dir / f"prompts-{run.name.replace('/', '_')}.png"))
    written = {figure.path.name for figure in figures}
    for stale in out_dir.glob("prompts-*.png"):
        if stale.name not in written:
            stale.unlink()
    return figures


def _unique_names(run_dirs: Sequence[Path]) -> list[str]:
    names = [d.name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{d.parent.name}/{d.name}" for d in run_dirs]


def _new_figure(rows: int, cols: int, width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy (seconds), loaded on demand: only when drawing
    from matplotlib.figure import Figure as MplFigure  # (the same)

    fig = MplFigure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def plot_dynamics(runs: Sequence[RunData], path: Path) -> Figure:
    panels = [(title, keys) for title, keys in PANELS if any(k in m for r in runs for m in r.metrics for k, _ in keys)]
    if any(r.evaluations for r in runs):
        panels.append((EVAL_PANEL, ()))
    cols = 2 if len(panels) > 1 else 1
    rows = -(-len(panels) // cols)
    fig, axes = _new_figure(rows, cols, 6.0 * cols, 3.2 * rows)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, keys) in zip(axes.flat, panels):
        for run, colour in zip(runs, colours):
            series = _eval_series(run) if title == EVAL_PANEL else [(k, label) for k, label in keys]
            for index, (key, label) in enumerate(series):
                # one run: a colour per metric; several: a colour per run, a line style per metric
                style, line_colour = (STYLES[index % len(STYLES)], colour) if len(runs) > 1 else ("-", f"C{index % 10}")
                source = run.evaluations if title == EVAL_PANEL else run.metrics
                points = [(m["step"], m[key]) for m in source if m.get(key) is not None]
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, style, color=line_colour, marker="o" if title == EVAL_PANEL else None,
                            markersize=3, label=label if len(runs) == 1 else f"{run.name}: {label}")
            if run.collapse_step is not None:
                ax.axvline(run.collapse_step, color=colour if len(runs) > 1 else "k", linestyle="--", linewidth=1,
                           alpha=0.7)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    collapsed = [f"{r.name}: step {r.collapse_step}" for r in runs if r.collapse_step is not None]
    fig.suptitle("Training dynamics" + (f"  (model collapse -- {', '.join(collapsed)})" if collapsed else ""))
    fig.savefig(path, dpi=100)
    return Figure(path, tuple(title for title, _ in panels))


def _eval_series(run: RunData) -> list[tuple[str, str]]:
    keys = sorted({k for e in run.evaluations for k in e if k != "step" and not k.endswith("/prompts")})
    return [(k, k.removeprefix("eval/")) for k in keys]


def plot_prompt_heatmap(run: RunData, path: Path) -> Figure:
    """Rows = prompts, columns = measured steps; value = +-confidence (greedy rows) or +-p_maj."""
    greedy = [r for r in run.prompt_rows if r["kind"] == "greedy"]
    rows = greedy or [r for r in run.prompt_rows if r["kind"] == "rollout"]
    correct_key, depth_key = ("correct", "confidence") if greedy else ("majority_correct", "p_maj")
    prompts = sorted({r["prompt_id"] for r in rows})
    steps = sorted({r["step"] for r in rows})
    grid = np.full((len(prompts), len(steps)), np.nan)
    for r in rows:
        if r[correct_key] is not None:
            grid[prompts.index(r["prompt_id"]), steps.index(r["step"])] = (1 if r[correct_key] else -1) * r[depth_key]
    fig, axes = _new_figure(1, 1, max(6.0, 0.25 * len(steps) + 3), max(2.5, 0.3 * len(prompts) + 1.5))
    ax = axes[0, 0]
    image = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(prompts)), prompts, fontsize=7)
    ticks = range(0, len(steps), max(1, len(steps) // 12))
    ax.set_xticks(list(ticks), [str(steps[i]) for i in ticks])
    ax.set_xlabel("step")
    title = "greedy answer" if greedy else "majority answer"
    ax.set_title(f"{run.name}: {title} per prompt")
    fig.colorbar(image, ax=ax, label=f"right (+, blue) / wrong (-, red) x {depth_key}")
    fig.savefig(path, dpi=100)
    return Figure(path, (title,))


def plot_probe(probe: Any, path: Path) -> Path:
    """`urlvr probe`'s figure for one model (a `commands.probe.ModelProbe`): left, each reward's
    AUROC against correctness (pooled and within groups; 0.5 = chance) with its expected
    direction; right, the p_maj histogram, split by whether the majority answer is right."""
    fig, axes = _new_figure(1, 2, 12.0, 3.8)
    left, right = axes[0]
    rewards = [r for r in probe.rewards if r.auroc is not None]
    if rewards:
        positions = range(len(rewards))
        left.barh([p - 0.2 for p in positions], [r.auroc for r in rewards], height=0.4, label="AUROC (pooled)")
        left.barh([p + 0.2 for p in positions], [r.group_auroc or 0.0 for r in rewards], height=0.4,
                  label="AUROC (within groups)")
        left.set_yticks(list(positions), [f"{r.reward} ({r.direction})" for r in rewards], fontsize=8)
        left.axvline(0.5, color="k", linestyle="--", linewidth=1)
        left.set_xlim(0, 1)
        left.legend(fontsize=7, loc="lower right")
        left.set_title("Reward vs correctness (expected direction)")
    else:
        left.text(0.5, 0.5, "no labelled prompts:\nrun `urlvr mcs` for a label-free measure",
                  ha="center", va="center", transform=left.transAxes)
        left.set_axis_off()
    hist = probe.p_maj_histogram
    bins = [f"{p:.2f}" for p in hist["p_maj"]]
    bottom = [0] * len(bins)
    for kind, colour in (("correct", "tab:blue"), ("wrong", "tab:red"), ("unlabelled", "tab:gray"), ("all", "tab:gray")):
        if kind in hist and any(hist[kind]):
            right.bar(bins, hist[kind], bottom=bottom, color=colour, label=f"majority {kind}" if kind != "all" else None)
            bottom = [b + c for b, c in zip(bottom, hist[kind])]
    right.set_xlabel("p_maj (share of the group giving the majority answer)")
    right.set_ylabel("prompts")
    right.set_title(f"p_maj histogram (majority right on {_pct(probe.majority_correct)} of prompts)")
    if right.patches and any(k in hist for k in ("correct", "wrong")):
        right.legend(fontsize=7)
    fig.suptitle(f"urlvr probe: {probe.model}  ({probe.prompts} prompts x {probe.group_size} samples, "
                 f"sample accuracy {_pct(probe.sample_accuracy)})")
    fig.savefig(path, dpi=100)
    return Path(path)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"
