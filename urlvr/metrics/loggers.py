"""Where per-step metrics go: metrics.jsonl (always), the console, wandb and TensorBoard (optional)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, TextIO

from urlvr.recipe import Recipe


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


class WandbLogger:
    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        import wandb  # optional extra, loaded on demand: only when logging.wandb is on

        cfg = recipe.logging.wandb
        mode = cfg.mode if cfg.mode != "auto" else ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, mode=mode, dir=str(run_dir), name=run_dir.name,
            config=recipe.model_dump(mode="json"), resume="allow",
        )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


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


def make_trackers(recipe: Recipe, run_dir: Path) -> list[Any]:
    """The experiment trackers the recipe turns on (each with `log(step, metrics)` and `close()`);
    they receive step metrics and evaluations alike, beside the run directory's own JSONL files."""
    loggers: list[Any] = []
    if recipe.logging.wandb.enabled:
        try:
            loggers.append(WandbLogger(recipe, run_dir))
        except ImportError:
            raise RuntimeError("logging.wandb.enabled is true but wandb is not installed: pip install 'urlvr[wandb]'") from None
    board = recipe.logging.tensorboard
    if board.enabled:
        try:
            loggers.append(TensorBoardLogger(Path(board.log_dir) if board.log_dir else run_dir / "tensorboard"))
        except ImportError:
            raise RuntimeError("logging.tensorboard.enabled is true but tensorboard is not installed: "
                               "pip install 'urlvr[tensorboard]'") from None
    return loggers
