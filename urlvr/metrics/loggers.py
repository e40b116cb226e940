"""Where per-step metrics go: metrics.jsonl (always), the console, wandb and TensorBoard (optional)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol, TextIO

from urlvr.recipe import Recipe


class MetricsLogger(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file; [] when it does not exist."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def open_for_append(path: Path, resume_from_step: int | None) -> TextIO:
    """Open a per-step JSONL file for appending; on resume, first drop the rows written after the
    checkpoint we resume from (they will be written again)."""
    if resume_from_step is not None and path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_from_step]
        path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")


class JsonlLogger:
    """One JSON object per step; keys are stable, NaN written as null."""

    def __init__(self, path: Path, *, resume_from_step: int | None = None) -> None:
        self.path = path
        self.file = open_for_append(path, resume_from_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class WandbLogger:
    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        import wandb

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
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

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


def make_loggers(recipe: Recipe, run_dir: Path, *, resume_from_step: int | None) -> list[Any]:
    loggers: list[Any] = [JsonlLogger(run_dir / "metrics.jsonl", resume_from_step=resume_from_step)]
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
