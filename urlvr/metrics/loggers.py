"""Where per-step metrics go: metrics.jsonl (always), the console, and the recipe's experiment
trackers (`logging.trackers`: wandb, TensorBoard or a plugin's, each a registered section)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TextIO

from pydantic import Field

from urlvr.recipe import Recipe
from urlvr.registry import Registry
from urlvr.section import VariantSection, check_variant_name


class MetricsLogger(Protocol):
    """What a tracker's `open` returns: it receives every step's metrics, then `close`."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file; [] when it does not exist."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


# Every file in a run directory that grows by rows during training, each row carrying its "step".
# On resume `truncate_appended_files` cuts all of them back to the checkpoint's step before anything
# is written again, and `open_for_append` refuses a name missing here, so a new per-step file
# cannot be forgotten (tests/test_training.py also checks that a run writes no other growing file).
APPENDED_FILES = ("metrics.jsonl", "eval.jsonl", "completions.jsonl", "prompts.jsonl")


def open_for_append(path: Path) -> TextIO:
    """Open one of the run's per-step files (`APPENDED_FILES`) for appending."""
    if Path(path).name not in APPENDED_FILES:
        raise ValueError(f"{path}: not a registered per-step file; add it to APPENDED_FILES so resume truncates it")
    return open(path, "a")


def truncate_appended_files(run_dir: Path, step: int) -> None:
    """Resume: drop the rows written after the checkpoint of `step` from every per-step file
    (the steps after it run again and write them again). A row torn by a kill mid-write goes too."""
    for name in APPENDED_FILES:
        path = Path(run_dir) / name
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if _row_step(line) <= step]
            path.write_text("".join(line + "\n" for line in kept))


def _row_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # empty or half-written: never kept


class JsonlLogger:
    """One JSON object per step; keys are stable, NaN written as null."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open_for_append(path)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# --------------------------------------------------------------------------- experiment trackers
class TrackerSection(VariantSection):
    """Base of an experiment tracker's section (`logging.trackers`): `name` is the registered name,
    every other field a knob with a docstring. `open(run_dir, config)` starts the tracker for a run
    (`config`: the resolved recipe as plain data) and returns a `MetricsLogger`, which then receives
    every step's metrics and every evaluation. A missing optional package is an ImportError there:
    the trainer turns it into a one-line error naming the tracker."""

    pip_extra: ClassVar[str] = ""  # the pip extra that installs the tracker's package, named in that error

    def open(self, run_dir: Path, config: dict[str, Any]) -> MetricsLogger:
        raise NotImplementedError


def _check_tracker(entry: Any, name: str) -> None:
    """Registration-time: a TrackerSection subclass with its own `open` (without one the run would
    fail at its start with NotImplementedError), carrying its name (`check_variant_name`)."""
    needs = (f"tracker {name!r}: {entry!r} must subclass urlvr.metrics.loggers.TrackerSection and define "
             "open(run_dir, config) (docs/writing-trackers.md)")
    if not (isinstance(entry, type) and issubclass(entry, TrackerSection)):
        raise TypeError(needs)
    check_variant_name(entry, name)
    if entry.open is TrackerSection.open:
        raise TypeError(needs)


TRACKERS: Registry[type[TrackerSection]] = Registry("tracker", check=_check_tracker)


@TRACKERS.register("wandb")
class WandbTracker(TrackerSection):
    """Weights & Biases (needs the `wandb` extra)."""

    name: Literal["wandb"] = "wandb"
    project: str = Field("urlvr", min_length=1)
    """wandb project."""
    entity: str | None = None
    """wandb entity (team)."""
    mode: Literal["auto", "online", "offline"] = "auto"
    """`auto` = online when WANDB_API_KEY is set, offline otherwise (into the run folder)."""
    pip_extra: ClassVar[str] = "wandb"

    def open(self, run_dir: Path, config: dict[str, Any]) -> MetricsLogger:
        import wandb  # optional extra, loaded on demand: only when a wandb tracker is on

        mode = self.mode if self.mode != "auto" else ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        run = wandb.init(project=self.project, entity=self.entity, mode=mode, dir=str(run_dir), name=run_dir.name,
                         config=config, resume="allow")
        return WandbLogger(run)


class WandbLogger:
    def __init__(self, run: Any) -> None:
        self.run = run  # a started wandb run

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


@TRACKERS.register("tensorboard")
class TensorBoardTracker(TrackerSection):
    """TensorBoard event files (needs the `tensorboard` extra): every per-step metric and every
    evaluation as a scalar; view with `tensorboard --logdir RUN_DIR/tensorboard`."""

    name: Literal["tensorboard"] = "tensorboard"
    log_dir: str | None = Field(None, min_length=1)
    """Folder of the event files; null = `<output_dir>/tensorboard`."""
    pip_extra: ClassVar[str] = "tensorboard"

    def open(self, run_dir: Path, config: dict[str, Any]) -> MetricsLogger:
        return TensorBoardLogger(Path(self.log_dir) if self.log_dir else run_dir / "tensorboard")


class TensorBoardLogger:
    """Each finite metric as a scalar under its own name (`reward/proxy_mean`, ...), at its step."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard extra: loaded on demand

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


CONSOLE_KEYS = (
    ("reward/proxy_mean", "proxy"), ("reward/ground_truth_mean", "gt"), ("actor/entropy_mean", "ent"),
    ("response/length_mean", "len"), ("loss/policy", "loss"), ("time/step", "s"),
)


def console_line(step: int, total: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for key, short in CONSOLE_KEYS:
        if key in metrics:
            parts.append(f"{short} {metrics[key]:.3g}")
    return "  ".join(parts)


def make_trackers(recipe: Recipe, run_dir: Path) -> list[MetricsLogger]:
    """The experiment trackers of `logging.trackers`, started (each with `log(step, metrics)` and
    `close()`); they receive step metrics and evaluations alike, beside the run directory's own
    JSONL files. A tracker whose package is missing is a one-line RuntimeError naming its extra."""
    config = recipe.model_dump(mode="json")
    loggers: list[MetricsLogger] = []
    for tracker in recipe.logging.trackers:
        try:
            opened = tracker.open(run_dir, config)
        except ImportError as err:
            install = f"pip install 'urlvr[{tracker.pip_extra}]'" if tracker.pip_extra else f"install {err.name or 'it'}"
            raise RuntimeError(f"logging.trackers: {tracker.name} needs a package that is not installed "
                               f"({err.name or err}): {install}") from None
        if not all(callable(getattr(opened, method, None)) for method in ("log", "close")):  # else: at the first step's end
            raise TypeError(f"logging.trackers: {tracker.name}'s open() returned {type(opened).__name__}, not a "
                            "MetricsLogger (an object with log(step, metrics) and close())")
        loggers.append(opened)
    return loggers
