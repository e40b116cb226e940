"""`urlvr sweep`: one recipe, a grid of `--set` overrides, one run directory per grid point.

A sweep point is exactly a list of overrides, the same `section.field=value` strings that
`urlvr train --set` takes, plus `output_dir=<sweep dir>/<point name>`, so any point can be
re-run (or resumed) by hand from the line `urlvr sweep --print` shows for it. Afterwards the
runs are overlaid by `urlvr plot`.

A sweep spec is a small YAML file kept next to the recipes:

    recipe: ../rise-and-fall.yaml      # relative to this file
    set: [trainer.total_steps=200]     # optional: overrides shared by every point
    output_dir: runs/my-sweep          # optional: default <recipe output_dir>/<spec file stem>
    grid:
      rollout.temperature: [0.6, 0.8, 1.0, 1.2]        # a field and its values
      kl:                                               # a named axis of labelled points,
        off: {algorithm.kl_coef: 0.0}                   # each setting one or more fields
        "0.005": {algorithm.kl_coef: 0.005}

The points are the cartesian product of the axes, in the order written. `urlvr sweep RECIPE.yaml
--grid rollout.temperature=0.6,0.8` sweeps a plain recipe without a spec file.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from urlvr.metrics.plots import plot_runs
from urlvr.recipe import Recipe, RecipeError, load_recipe
from urlvr.recipe.changes import FieldChange, format_changes, recipe_changes
from urlvr.recipe.load import read_yaml_mapping
from urlvr.registry import repeated
from urlvr.trainer.checkpoint import checkpoint_step, latest_checkpoint
from urlvr.trainer.resume import recorded_recipe
from urlvr.trainer.run import train

SPEC_KEYS = ("recipe", "grid", "set", "output_dir")


@dataclass(frozen=True)
class Axis:
    """One dimension of the grid: labelled choices, each a mapping of recipe field -> value."""

    name: str  # the field for a list axis, the spec's axis name for a labelled one
    choices: tuple[tuple[str, Mapping[str, Any]], ...]

    @property
    def short(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class SweepPoint:
    name: str  # also the run directory's name, e.g. `temperature=0.6`
    overrides: tuple[str, ...]  # shared overrides, this point's, then output_dir
    run_dir: Path


@dataclass(frozen=True)
class Sweep:
    recipe: Path
    out_dir: Path
    axes: tuple[Axis, ...]
    shared: tuple[str, ...] = ()

    def points(self) -> list[SweepPoint]:
        """The cartesian product of the axes, first axis slowest."""
        short = [axis.short for axis in self.axes]
        prefixes = [axis.name if short.count(axis.short) > 1 else axis.short for axis in self.axes]
        points = []
        for combo in itertools.product(*(axis.choices for axis in self.axes)):
            name = ",".join(f"{prefix}={_safe(label)}" for prefix, (label, _) in zip(prefixes, combo)) or "base"
            fields = [f"{key}={format_value(value)}" for _, values in combo for key, value in values.items()]
            run_dir = self.out_dir / name
            points.append(SweepPoint(name, (*self.shared, *fields, f"output_dir={run_dir}"), run_dir))
        twice = repeated(p.name for p in points)
        if twice:
            raise RecipeError(f"sweep: two grid points share the run directory name {twice[0]!r}; label them apart")
        return points


def format_value(value: Any) -> str:
    """A value as the text of a `--set` override, which is parsed back as YAML: strings stay bare
    when YAML reads them back as the same string, everything else is written as JSON (valid YAML)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value and "\n" not in value:
                return value
        except yaml.YAMLError:
            pass
    if isinstance(value, float):
        text = repr(value)  # YAML 1.1 reads `1e-06` as a string: give the mantissa a dot
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text
    return json.dumps(value)


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", label)


def _label(value: Any) -> str:
    """A list axis's point label: the value as written (compact JSON for lists and mappings; a
    labelled axis gives such points readable names)."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def parse_axis(name: str, values: Any, origin: str) -> Axis:
    """A spec's grid entry: `field: [values]` or `axis: {label: {field: value, ...}}`."""
    if isinstance(values, list):
        if not values:
            raise RecipeError(f"{origin}: grid.{name}: no values")
        return Axis(name, tuple((_label(v), {name: v}) for v in values))
    if isinstance(values, Mapping) and values:
        choices = []
        for label, fields in values.items():
            if not isinstance(fields, Mapping) or not fields:
                raise RecipeError(f"{origin}: grid.{name}.{label}: a labelled point is a mapping of "
                                  "recipe fields to values, e.g. {algorithm.kl_coef: 0.005}")
            choices.append((str(label), dict(fields)))
        return Axis(name, tuple(choices))
    raise RecipeError(f"{origin}: grid.{name}: expected a list of values or a mapping of labelled points")


def parse_grid_option(option: str) -> Axis:
    """`--grid field=v1,v2,...`: each value is parsed as YAML (commas inside [] or {} do not split)."""
    field, sep, raw = option.partition("=")
    if not sep or not field.strip() or not raw.strip():
        raise RecipeError(f"--grid {option!r}: expected section.field=value1,value2,...")
    values = [yaml.safe_load(part) for part in _split_top_level(raw)]
    return parse_axis(field.strip(), values, "--grid")


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def load_sweep(path: str | Path, *, grid: Sequence[str] = (), overrides: Sequence[str] = (),
               recipe: str | Path | None = None, out_dir: str | Path | None = None) -> Sweep:
    """A sweep from a spec file, or from a recipe file plus `--grid` options.

    ``recipe`` replaces the spec's recipe (e.g. one of the paper's B.3 sweeps over another reward);
    ``overrides`` are appended to the shared ones; ``grid`` adds axes after the spec's."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: sweep spec or recipe not found")
    data = read_yaml_mapping(path, "sweep spec or recipe")
    is_spec = "grid" in data
    if is_spec:
        unknown = sorted(set(data) - set(SPEC_KEYS))
        if unknown:
            raise RecipeError(f"{path}: unknown sweep key {unknown[0]!r} (known: {', '.join(SPEC_KEYS)})")
        if not isinstance(data["grid"], dict):
            raise RecipeError(f"{path}: grid: expected a mapping of fields (or axis names) to values")
        if "recipe" not in data and recipe is None:
            raise RecipeError(f"{path}: a sweep spec needs `recipe:` (the path of the recipe it sweeps)")
        base = Path(recipe) if recipe is not None else Path(os.path.normpath(path.parent / str(data["recipe"])))
        shared = data.get("set") or []
        if not isinstance(shared, list) or not all(isinstance(s, str) for s in shared):
            raise RecipeError(f"{path}: set: expected a list of section.field=value strings")
        axes = [parse_axis(name, values, str(path)) for name, values in data["grid"].items()]
        default_out = data.get("output_dir")
    else:
        if recipe is not None:
            raise RecipeError(f"{path}: --recipe replaces a sweep spec's recipe; this file is a recipe")
        base, shared, axes, default_out = path, [], [], None
    axes += [parse_grid_option(option) for option in grid]
    if not axes:
        raise RecipeError(f"{path}: nothing to sweep: give a sweep spec with `grid:` or --grid field=v1,v2")
    _each_field_on_one_axis(axes, path)
    shared = [*shared, *overrides]
    resolved = load_recipe(base, shared)  # the base must be valid before any point is
    name = path.stem if is_spec else "sweep"
    out = Path(out_dir) if out_dir is not None else Path(default_out) if default_out else Path(resolved.output_dir) / name
    return Sweep(recipe=base, out_dir=out, axes=tuple(axes), shared=tuple(shared))


def _each_field_on_one_axis(axes: Sequence[Axis], origin: Path) -> None:
    """Two axes setting one field would both label every point while only the later value is
    applied: the run names would lie about what ran."""
    owner: dict[str, str] = {}
    for axis in axes:
        for field in {field for _, choice in axis.choices for field in choice}:
            if field in owner:
                raise RecipeError(f"{origin}: {field} is swept by two axes ({owner[field]!r} and {axis.name!r}); "
                                  "only the later value would apply: give its values on one axis")
            owner[field] = axis.name


def validate_points(sweep: Sweep) -> list[SweepPoint]:
    """Every point's recipe, validated; the first bad one raises naming its point."""
    points = sweep.points()
    for point in points:
        try:
            load_recipe(sweep.recipe, point.overrides)
        except RecipeError as err:
            raise RecipeError(f"sweep point {point.name}: {err}") from None
    return points


def launch_lines(sweep: Sweep, *, launcher: str = "urlvr") -> list[str]:
    """Shell lines: one `train` per point, then the `plot` that overlays them."""
    points = sweep.points()
    lines = [f"# {len(points)} runs of {sweep.recipe}, then their overlay"]
    for point in points:
        sets = " ".join(f"--set {shlex.quote(o)}" for o in point.overrides)
        lines.append(f"{launcher} train {shlex.quote(str(sweep.recipe))} {sets}")
    dirs = " ".join(shlex.quote(str(p.run_dir)) for p in points)
    lines.append(f"urlvr plot {dirs} --out {shlex.quote(str(sweep.out_dir / 'plots'))}")
    return lines


def _say(line: str) -> None:
    print(line, flush=True)  # flushed: in a log file each point's line shows as it starts


def run_sweep(sweep: Sweep, *, say=_say) -> list[Path]:
    """Run every point in this process, one after another, then overlay them. A point whose run
    finished (summary.json) with the point's recipe is skipped; one that started is resumed from
    its last checkpoint. A point whose folder holds a run of another recipe is refused before
    anything runs (`earlier_run_changes`): the overlay would show it under the new point's name."""
    points = validate_points(sweep)  # a typo in the last point fails now, not after hours of the first
    recipes = [load_recipe(sweep.recipe, point.overrides) for point in points]
    extended = [earlier_run_changes(point, recipe) for point, recipe in zip(points, recipes, strict=True)]
    for index, (point, recipe, changes) in enumerate(zip(points, recipes, extended, strict=True), 1):
        if (point.run_dir / "summary.json").is_file() and not changes:
            say(f"urlvr sweep: [{index}/{len(points)}] {point.name}: finished earlier, skipped")
            continue
        started = (point.run_dir / "metrics.jsonl").is_file()
        say(f"urlvr sweep: [{index}/{len(points)}] {point.name}: {'resuming' if started else 'training'} in {point.run_dir}")
        train(recipe, resume=point.run_dir if started else None)
    dirs = [p.run_dir for p in points]
    for figure in plot_runs(dirs, sweep.out_dir / "plots"):
        say(f"urlvr sweep: {figure.path}")
    return dirs


# what a sweep may change in a point that already ran: it continues the run (resume) to more steps
SWEEP_EXTENDS = ("trainer.total_steps",)


def earlier_run_changes(point: SweepPoint, recipe: Recipe) -> list[FieldChange]:
    """The changes between the recipe the point's folder recorded (if it holds a run) and the
    point's recipe now: only SWEEP_EXTENDS may differ (the run is resumed to more steps); any other
    field is a RecipeError listing each difference (old -> new), since the run there was trained
    with another recipe and the overlay would label it as this point."""
    if not (point.run_dir / "metrics.jsonl").is_file():
        return []
    latest = latest_checkpoint(point.run_dir)
    recorded = recorded_recipe(point.run_dir, checkpoint_step(latest) if latest else 2**62)
    if recorded is None:
        return []
    changes = recipe_changes(recorded[1], recipe.model_dump(mode="json"))
    foreign = [c for c in changes if c.path not in SWEEP_EXTENDS]
    if foreign:
        raise RecipeError(
            f"sweep point {point.name}: {point.run_dir} holds a run of another recipe ({recorded[0].name}):\n"
            f"{format_changes(foreign)}\ngive the sweep a new --out, or delete that run directory")
    return changes
