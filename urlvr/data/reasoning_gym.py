"""reasoning-gym tasks as prompts (`data.source.kind: reasoning_gym`; the `reasoning-gym` extra).

reasoning-gym (Stojanovski et al. 2025, github.com/open-thought/reasoning-gym) generates
procedural tasks with a verifier each, locally and reproducibly from a seed: no download. A
record keeps the task name and the entry's metadata, so the `reasoning_gym` reward can hand the
extracted answer to the task's own `score_answer`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from urlvr.data.records import DataError, PromptRecord


def reasoning_gym_problems(tasks: Sequence[str], size: int, seed: int,
                           config: Mapping[str, Mapping[str, Any]] | None = None) -> list[PromptRecord]:
    """`size` entries of each task (seed `seed + index of the task`), in task order; `config[task]`
    holds that task's generator settings. The label is the entry's reference answer."""
    try:
        import reasoning_gym  # optional extra, loaded on demand
    except ImportError:
        raise DataError("data source 'reasoning_gym' needs reasoning-gym: pip install 'urlvr[reasoning-gym]'") from None
    records = []
    for index, task in enumerate(tasks):
        try:
            dataset = reasoning_gym.create_dataset(task, size=size, seed=seed + index, **dict((config or {}).get(task, {})))
        except (ValueError, TypeError) as err:  # unknown task or bad settings: one line, not a traceback
            raise DataError(f"reasoning_gym task {task!r}: {err}") from None
        for row, entry in enumerate(dataset):
            records.append(PromptRecord(
                prompt_id=f"rg-{task}-s{seed + index}-{row:06d}", prompt=entry["question"], label=str(entry["answer"]),
                metadata={"reasoning_gym_task": task, "reasoning_gym_metadata": entry.get("metadata", {})}))
    return records
