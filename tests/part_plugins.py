"""Plugin parts for tests/test_part_variants.py, loaded through a recipe's `plugins` as users do:
a data source with knobs of its own, and an experiment tracker that keeps what it receives."""

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from urlvr.data.loaders import DATA_SOURCES, DataSourceSection
from urlvr.data.records import PromptRecord
from urlvr.metrics.loggers import TRACKERS, TrackerSection

TRACKED: list[dict[str, Any]] = []  # one entry per opened tracker: its knob, what it logged, whether closed


@DATA_SOURCES.register("test_squares")
class SquaresSource(DataSourceSection):
    """`What is n*n?` for n = start, start + 1, ... (labelled)."""

    kind: Literal["test_squares"] = "test_squares"
    count: int = Field(8, ge=1)
    """How many questions."""
    start: int = 1
    """The first n."""

    @staticmethod
    def read(count: int, start: int) -> list[PromptRecord]:
        return [PromptRecord(f"sq-{n}", f"What is {n}*{n}?", str(n * n)) for n in range(start, start + count)]


class MemoryLogger:
    def __init__(self, entry: dict[str, Any]) -> None:
        self.entry = entry

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.entry["logged"].append((step, dict(metrics)))

    def close(self) -> None:
        self.entry["closed"] = True


@TRACKERS.register("test_memory")
class MemoryTracker(TrackerSection):
    """Keeps every logged row in `TRACKED`."""

    name: Literal["test_memory"] = "test_memory"
    label: str = "run"
    """A label kept beside the rows."""

    def open(self, run_dir: Path, config: dict[str, Any]) -> MemoryLogger:
        entry = {"label": self.label, "run_dir": run_dir, "config": config, "logged": [], "closed": False}
        TRACKED.append(entry)
        return MemoryLogger(entry)
