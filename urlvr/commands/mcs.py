"""`urlvr mcs`: rank candidate base models by their prior, without RL on labels (paper §6).

For each model, a short majority-vote run with the paper's aggressive diagnostic settings
(§6.3: mini-batch of 1 prompt per optimizer step, 8 samples per prompt) is stopped at its Model
Collapse Step -- the first step at which Reward Accuracy falls below 1% -- or at a step cap.
A model that sustains intrinsic training longer has the stronger prior and, per the paper
(Fig. 11), the larger gain from real RL. Ranking: later collapse first; models that never
collapsed within the cap rank above all that did.

Labels feed Reward Accuracy (metrics only; they never reach the reward). Without labels the
run stops at the first label-free alarm instead -- by default proxy saturation (the majority
agrees with itself on >= 95% of samples), which is an approximation of the paper's definition.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from urlvr.commands.out_dir import check_output_dir, clear_owned
from urlvr.errors import RecipeError
from urlvr.metrics.loggers import read_jsonl
from urlvr.models.resolve import checked_model_path
from urlvr.progress import format_seconds
from urlvr.recipe import load_recipe
from urlvr.registry import repeated
from urlvr.trainer.run import train

# the diagnostic: §6.3's aggressive settings, stop at collapse; everything else is the base recipe's
MCS_SETTINGS: dict[str, Any] = {
    "rollout": {"group_size": 8},
    "reward": {"terms": [{"name": "majority_vote"}], "vote_group_size": None, "certainty_logits": "scaled"},
    "trainer": {"prompts_per_minibatch": 1, "save_every": 0, "export_final_model": False},  # MBS = 1 prompt
    "collapse": {"action": "stop"},
    "logging": {"completions_per_step": 0},
}
LABEL_FREE_DETECTORS = [{"name": "proxy_saturation", "window": 3}]


@dataclass(frozen=True)
class MCSResult:
    model: str
    collapse_step: int | None  # None: did not collapse within `steps_run`
    stopped_by: str | None  # "model_collapse" (Reward Accuracy < threshold) or a label-free detector
    steps_run: int
    response_tokens: int
    wall_seconds: float
    ground_truth_start: float | None  # mean ground-truth reward at step 1 (labels only)
    ground_truth_peak: float | None
    ground_truth_gain: float | None  # peak - start: the "rise" before the fall
    run_dir: str


def mcs_recipe(base: dict[str, Any], model: str, output_dir: Path, *, max_steps: int, labels: bool) -> dict[str, Any]:
    """The base recipe (a dict) with the diagnostic settings, this model and a step cap."""
    recipe = json.loads(json.dumps(base))  # deep copy of plain data
    for section, values in MCS_SETTINGS.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    recipe.pop("eval", None)  # no evaluation: the base's eval knobs would do nothing, and are refused
    recipe["model"] = {**recipe.get("model", {}), "path": model}
    recipe["output_dir"] = str(output_dir)
    recipe["trainer"]["total_steps"] = max_steps
    recipe["trainer"].setdefault("prompts_per_step", 32)  # §6.3 (Table 3): batch 32
    if recipe["trainer"].get("max_tokens_per_micro_batch") is None:  # a token budget cuts micro-batches itself
        micro = recipe["trainer"].get("micro_batch_size", 8)
        recipe["trainer"]["micro_batch_size"] = min(micro, recipe["rollout"]["group_size"])  # fits one prompt's group
    if labels:
        recipe["reward"]["oracle"] = recipe["reward"].get("oracle") or "ground_truth"
        recipe["collapse"].setdefault("detectors", [])  # the Model Collapse Step alone stops the run
    else:
        recipe["reward"]["oracle"] = None
        recipe["collapse"].setdefault("detectors", LABEL_FREE_DETECTORS)
        for knob in ("reward_accuracy_threshold", "smoothing_window"):  # no labels: no Model Collapse Step
            recipe["collapse"].pop(knob, None)
    return recipe


def _slug(model: str, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in model.strip("/").replace("/", "__")) or "model"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def run_mcs(models: Sequence[str], base: dict[str, Any], out_dir: Path, *, max_steps: int = 200,
            labels: bool | None = None, overrides: Sequence[str] = (), overwrite: bool = False,
            say: Callable[[str], None] | None = None) -> list[MCSResult]:
    """One diagnostic run per model (sequentially, in this process); results ranked best first,
    also written to `out_dir/mcs.json` and `out_dir/mcs.csv`. `labels=None`: use labels when
    the data source has a label field. `overrides` (`section.field=value`) are applied last.
    An `out_dir` holding an earlier mcs's tables or run directories is refused before anything
    runs, unless `overwrite`, which deletes them first (the new runs write there). `say` prints
    a line per model as it starts and ends (default: stderr, flushed, so a log file shows them).
    Every model path is checked before anything is deleted or run (RecipeError naming it), and
    the tables are rewritten after each model, so a run that fails later keeps the finished rows."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    twice = repeated(models)
    if twice:  # the same recipe and seed twice is the same run twice: an hour lost, no new row
        raise RecipeError(f"urlvr mcs: {', '.join(twice)} listed more than once; name each model once")
    out_dir = Path(out_dir)
    slugs: set[str] = set()
    run_dirs = [out_dir / _slug(model, slugs) for model in models]
    stale = check_output_dir(out_dir, [out_dir / "mcs.json", out_dir / "mcs.csv", *_listed_runs(out_dir), *run_dirs],
                             overwrite=overwrite, command="mcs")
    if labels is None:
        source = load_recipe(mcs_recipe(base, models[0], out_dir, max_steps=max_steps, labels=True), overrides).data.source
        labels = getattr(source, "label_field", "answer") is not None  # arithmetic/countdown: labelled
    recipes = [load_recipe(mcs_recipe(base, model, run_dir, max_steps=max_steps, labels=labels), overrides)
               for model, run_dir in zip(models, run_dirs, strict=True)]  # a bad override fails before any run
    for model in models:  # a mistyped model fails before the earlier tables are deleted or a model runs
        checked_model_path(model)
    clear_owned(stale)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for index, (model, run_dir, recipe) in enumerate(zip(models, run_dirs, recipes, strict=True), 1):
        say(f"urlvr mcs: [{index}/{len(models)}] {model}: diagnostic run in {run_dir} (at most {max_steps} steps)")
        started = time.perf_counter()
        train(recipe)
        results.append(_result(model, run_dir, time.perf_counter() - started))
        done = results[-1]
        ended = f"collapsed at step {done.collapse_step}" if done.collapse_step is not None else \
            f"no collapse in {done.steps_run} steps"
        say(f"urlvr mcs: [{index}/{len(models)}] {model}: {ended} ({format_seconds(done.wall_seconds)})")
        write_table(rank(results), out_dir)  # after every model: a later failure keeps the finished rows
    return rank(results)


def _listed_runs(out_dir: Path) -> list[Path]:
    """The run directories an earlier mcs.json in `out_dir` lists (only those inside `out_dir`)."""
    try:
        listed = json.loads((out_dir / "mcs.json").read_text())
    except (OSError, ValueError):
        return []
    runs = [Path(row["run_dir"]) for row in listed if isinstance(row, dict) and isinstance(row.get("run_dir"), str)]
    return [run for run in runs if run.resolve().parent == out_dir.resolve()]


def _result(model: str, run_dir: Path, wall_seconds: float) -> MCSResult:
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    stopped = summary.get("stopped_early")
    gt = [m["reward/ground_truth_mean"] for m in metrics if m.get("reward/ground_truth_mean") is not None]
    return MCSResult(
        model=model, collapse_step=stopped["step"] if stopped else None, stopped_by=stopped["detector"] if stopped else None,
        steps_run=summary["steps"], response_tokens=int(sum(m["perf/response_tokens"] for m in metrics)),
        wall_seconds=round(wall_seconds, 2), ground_truth_start=gt[0] if gt else None,
        ground_truth_peak=max(gt) if gt else None, ground_truth_gain=max(gt) - gt[0] if gt else None,
        run_dir=str(run_dir),
    )


def rank(results: Sequence[MCSResult]) -> list[MCSResult]:
    """Later collapse first; never-collapsed ones (by steps survived) above all collapsed ones."""
    return sorted(results, key=lambda r: (r.collapse_step is None, r.collapse_step or r.steps_run), reverse=True)


COLUMNS = ("rank", "model", "collapse_step", "stopped_by", "steps_run", "response_tokens", "wall_seconds",
           "ground_truth_gain")


def format_table(results: Sequence[MCSResult]) -> str:
    rows = [COLUMNS] + [tuple(_cell(v) for v in _row(i, r)) for i, r in enumerate(results, 1)]
    widths = [max(len(row[c]) for row in rows) for c in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _row(index: int, result: MCSResult) -> tuple:
    collapse = result.collapse_step if result.collapse_step is not None else f">{result.steps_run}"
    return (index, result.model, collapse, result.stopped_by or "-", result.steps_run, result.response_tokens,
            result.wall_seconds, result.ground_truth_gain)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_table(results: Sequence[MCSResult], out_dir: Path) -> None:
    (out_dir / "mcs.json").write_text(json.dumps([{"rank": i, **asdict(r)} for i, r in enumerate(results, 1)], indent=2))
    with open(out_dir / "mcs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["rank", *asdict(results[0])] if results else ["rank"])
        writer.writeheader()
        writer.writerows({"rank": i, **asdict(r)} for i, r in enumerate(results, 1))
