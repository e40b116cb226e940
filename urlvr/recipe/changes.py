"""What differs between two resolved recipes, one dotted field per line (`optim.lr: 1e-06 -> 3e-05`).

A resume (`urlvr train --resume`) and a sweep that meets an earlier run's folder compare the
recipe a run directory recorded (`recipe.yaml`) with the one they are about to run, so a changed
field is said, recorded or refused -- never dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["FieldChange", "recipe_changes", "format_changes"]

_ABSENT = object()


@dataclass(frozen=True)
class FieldChange:
    path: str  # dotted, list items by index: `reward.terms.0.weight`
    old: Any
    new: Any

    @property
    def added(self) -> bool:
        """The old recipe has no such field (recorded by an older urlvr, before the field existed)."""
        return self.old is _ABSENT

    def __str__(self) -> str:
        return f"{self.path}: {_show(self.old)} -> {_show(self.new)}"


def recipe_changes(old: Mapping[str, Any], new: Mapping[str, Any], *,
                   ignore: Iterable[str] = ("output_dir",)) -> list[FieldChange]:
    """The leaf fields whose values differ between two recipes as plain data (`model_dump(mode="json")`),
    in the order of `new` (then fields only `old` has). Sections and lists are walked while both
    sides are sections (lists of equal length); otherwise the whole value is one change
    (`model.lora: null -> {...}`). Paths in `ignore` (and below them) are skipped."""
    skipped = tuple(ignore)
    found: list[FieldChange] = []
    _walk(old, new, "", found)
    return [c for c in found if not any(c.path == p or c.path.startswith(p + ".") for p in skipped)]


def format_changes(changes: Iterable[FieldChange], indent: str = "  ") -> str:
    return "\n".join(f"{indent}{change}" for change in changes)


def _walk(old: Any, new: Any, path: str, found: list[FieldChange]) -> None:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in [*new, *(k for k in old if k not in new)]:
            _walk(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{path}.{key}" if path else str(key), found)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for index, (a, b) in enumerate(zip(old, new)):
            _walk(a, b, f"{path}.{index}", found)
    elif old != new:
        found.append(FieldChange(path, old, new))


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    return json.dumps(value, separators=(", ", ": "))
