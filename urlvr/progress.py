"""Progress of a long job (`done/total` items) that reads the same in a terminal and in a log file.

On a terminal: a rich bar (transient, on stderr). Anywhere else (`urlvr probe ... > probe.log
2>&1`, a Slurm job, a pipe): plain lines on stderr, one when the job starts, one whenever
`every_seconds` have passed since the last, and one at the end, each with done/total, elapsed
time and an estimate of what is left:

    urlvr probe: sampling urlvr/tiny: 16/64 prompts (25%), 12 s elapsed, ~36 s left

A bar alone shows nothing in a file until the job ends (rich draws no bar where output is not a
terminal), so a long job logged to a file looked hung.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = ["JobProgress", "format_seconds"]


class JobProgress:
    """`with JobProgress("urlvr probe: sampling", total=64, unit="prompts") as bar: bar.advance(8)`.

    `interactive=None` asks `stream.isatty()`; `clock` (seconds, monotonic) is injectable so a test
    can step time instead of waiting for it. `every_seconds` spaces the plain lines (default 30 s)."""

    def __init__(self, label: str, total: int, *, unit: str = "items", stream: TextIO | None = None,
                 interactive: bool | None = None, every_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.unit, self.done = label, total, unit, 0
        self.stream = stream if stream is not None else sys.stderr
        self.every_seconds, self.clock = every_seconds, clock
        self.started = self.last_line = clock()
        if interactive is None:
            interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = _rich_bar(label, total, self.stream) if interactive else None
        if self.bar is None:
            self._line(f"{label}: {total} {unit}")

    def __enter__(self) -> JobProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.advance(self.bar.task_ids[0], count)
            return
        now = self.clock()
        if self.done >= self.total or now - self.last_line >= self.every_seconds:
            self.last_line = now
            self._line(self.status(now))

    def status(self, now: float | None = None) -> str:
        """`label: done/total unit (pct%), N s elapsed, ~M s left` (no estimate before the first item)."""
        elapsed = (self.clock() if now is None else now) - self.started
        share = self.done / self.total if self.total else 1.0
        left = "" if not self.done or self.done >= self.total else \
            f", ~{format_seconds(elapsed * (self.total - self.done) / self.done)} left"
        return (f"{self.label}: {self.done}/{self.total} {self.unit} ({share:.0%}), "
                f"{format_seconds(elapsed)} elapsed{left}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)  # flushed: a log file shows it now, not at exit


def format_seconds(seconds: float) -> str:
    """`42 s`, `3 min 5 s`, `2 h 07 min`: a duration in the units a reader of a log wants."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _rich_bar(label: str, total: int, stream: TextIO):
    bar = Progress(TextColumn(f"[bold]{escape(label)}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   transient=True, console=Console(file=stream))
    bar.add_task("job", total=total)
    bar.start()
    return bar
