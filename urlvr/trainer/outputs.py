"""RunOutputs: everything a run writes as it goes, in one object.

Per step: `metrics.jsonl` and the experiment trackers (`logging.trackers`), `completions.jsonl`, the tracked
prompts' rows (`prompts.jsonl`), the console line and the progress bar; per evaluation:
`eval.jsonl` and the trackers. Only the main rank writes; on the others every call is a no-op,
so the run loop never asks which rank it is on. On resume every per-step file is first cut back
to the checkpoint (`metrics.loggers.APPENDED_FILES`), since the steps after it run again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from urlvr.metrics.loggers import JsonlLogger, console_line, make_trackers, open_for_append, truncate_appended_files
from urlvr.metrics.tracking import PromptTrackWriter
from urlvr.recipe import Recipe


class RunOutputs:
    def __init__(self, recipe: Recipe, run_dir: Path, *, main: bool, total_steps: int, start_step: int,
                 resume: bool) -> None:
        self.main, self.total_steps = main, total_steps
        self.metrics = self.evaluations = self.completions = self.prompts = self.progress = None
        self.trackers: list[Any] = []
        if not main:
            return
        if resume:
            truncate_appended_files(run_dir, start_step)
        self.metrics = JsonlLogger(run_dir / "metrics.jsonl")
        # metrics.jsonl stays one line per step; eval.jsonl exists only where something evaluates
        self.evaluations = JsonlLogger(run_dir / "eval.jsonl") if recipe.eval.source is not None else None
        self.completions = open_for_append(run_dir / "completions.jsonl")
        self.prompts = PromptTrackWriter(run_dir / "prompts.jsonl") if recipe.dynamics.track_prompts else None
        self.trackers = make_trackers(recipe, run_dir)  # logging.trackers: steps and evaluations alike
        self.progress = _progress(recipe.logging.console, total_steps, start_step)

    def __enter__(self) -> RunOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def step(self, step: int, metrics: dict[str, float], completions: list[dict], prompt_rows: list[dict]) -> None:
        if not self.main:
            return
        for logger in (self.metrics, *self.trackers):
            logger.log(step, metrics)
        self.completions.writelines(json.dumps(row) + "\n" for row in completions)
        self.completions.flush()
        self.prompt_rows(prompt_rows)
        if self.progress:
            self.progress.console.print(console_line(step, self.total_steps, metrics), soft_wrap=True)
            self.progress.advance(self.progress.task_ids[0])

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        if self.main:
            for logger in (self.evaluations, *self.trackers):
                if logger is None:
                    continue
                logger.log(step, metrics)

    def prompt_rows(self, rows: list[dict]) -> None:
        if self.prompts:
            self.prompts.write(rows)

    def say(self, *lines: str) -> None:
        """urlvr's own console lines (above the progress bar while it runs, else on stderr)."""
        if not self.main:
            return
        for line in lines:
            if self.progress:
                self.progress.console.print(line, soft_wrap=True)
            else:
                print(line, file=sys.stderr)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None
        for handle in (self.metrics, self.evaluations, self.completions, self.prompts, *self.trackers):
            if handle is not None:
                handle.close()
        self.metrics = self.evaluations = self.completions = self.prompts = None
        self.trackers = []


def _progress(enabled: bool, total: int, done: int):
    if not enabled:
        return None
    progress = Progress(TextColumn("[bold]urlvr"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    progress.add_task("train", total=total, completed=done)
    progress.start()
    return progress
