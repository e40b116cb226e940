"""Prompt loaders: a local file, a `datasets` dataset, a named paper dataset (through its adapter)
or a synthetic generator -> PromptRecords.

Every loader is a registered *data source* whose keyword arguments are the fields of the
matching recipe section (`data.source`): the trainer calls
``load_records(**recipe.data.source.model_dump())``.
Bad data fails here, before step 1, with a `DataError` naming the file and the row or line:
rows count from 0 (the number that ends a default prompt id, ``<stem>-<row>``); JSONL errors
give instead the 1-based line number an editor shows.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from urlvr.data import synthetic
from urlvr.data.adapters import load_adapter_records
from urlvr.data.readers import RawRow, open_dataset, read_file_rows
from urlvr.data.reasoning_gym import reasoning_gym_problems
from urlvr.data.records import DataError, PromptRecord
from urlvr.registry import Registry

DataSource = Callable[..., list[PromptRecord]]
DATA_SOURCES: Registry[DataSource] = Registry("data source")



def load_records(kind: str, **options: Any) -> list[PromptRecord]:
    """Load prompts from the data source registered as ``kind`` (file | datasets | adapter |
    arithmetic | countdown | reasoning_gym | a plugin's); ``options`` are that source's keyword arguments."""
    source = DATA_SOURCES.get(kind)
    try:
        inspect.signature(source).bind(**options)
    except TypeError as err:
        raise DataError(f"data source {kind!r}: {err}") from None
    records = source(**options)
    if not records:
        raise DataError(f"data source {kind!r} gave no prompts (options: {options})")
    return records


# --------------------------------------------------------------------------- files
@DATA_SOURCES.register("file")
def load_records_from_file(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    label_field: str | None = "answer",
    id_field: str | None = None,
    limit: int | None = None,
) -> list[PromptRecord]:
    """Read a ``.jsonl``, ``.json`` (a list of objects, or ``{"data": [...]}``) or ``.parquet``
    file. ``label_field=None`` for unlabelled data; otherwise every row needs a label."""
    path = Path(path)
    return _to_records(
        read_file_rows(path, limit),
        source=str(path),
        id_prefix=path.stem,
        prompt_field=prompt_field,
        label_field=label_field,
        id_field=id_field,
    )


# --------------------------------------------------------------------------- datasets
def load_records_from_datasets(
    name_or_path: str,
    *,
    split: str = "train",
    subset: str | None = None,
    prompt_field: str = "prompt",
    label_field: str | None = "answer",
    id_field: str | None = None,
    limit: int | None = None,
) -> list[PromptRecord]:
    """Read a `datasets` dataset: a directory written by ``save_to_disk`` (``load_from_disk``),
    a local data file or directory, or a hub id (``load_dataset``; needs the network)."""
    dataset = open_dataset(name_or_path, split=split, subset=subset)
    local = Path(name_or_path)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    rows = ((row, f"row {row}", item) for row, item in enumerate(dataset))
    return _to_records(
        rows,
        source=name_or_path,
        id_prefix=local.name if local.exists() else name_or_path,
        prompt_field=prompt_field,
        label_field=label_field,
        id_field=id_field,
    )


@DATA_SOURCES.register("datasets")
def _datasets_source(name: str, **options: Any) -> list[PromptRecord]:
    """The recipe calls the dataset `name`; the loader's own argument says what it accepts."""
    return load_records_from_datasets(name, **options)


# --------------------------------------------------------------------------- named datasets
@DATA_SOURCES.register("adapter")
def _adapter_source(dataset: str, **options: Any) -> list[PromptRecord]:
    """A paper dataset by name (dapo-17k, aime-2024, ...), read through its registered adapter."""
    return load_adapter_records(dataset, **options)


# --------------------------------------------------------------------------- synthetic
@DATA_SOURCES.register("arithmetic")
def _arithmetic_source(num_problems: int, seed: int, min_value: int = 0, max_value: int = 99,
                       operators: tuple[str, ...] = ("+", "-")) -> list[PromptRecord]:
    return synthetic.arithmetic_problems(num_problems, seed, min_value=min_value, max_value=max_value, operators=operators)


@DATA_SOURCES.register("countdown")
def _countdown_source(num_problems: int, seed: int) -> list[PromptRecord]:
    return synthetic.countdown_problems(num_problems, seed)


@DATA_SOURCES.register("reasoning_gym")
def _reasoning_gym_source(tasks: list[str], size: int, seed: int, config: dict | None = None) -> list[PromptRecord]:
    return reasoning_gym_problems(tasks, size, seed, config)


# --------------------------------------------------------------------------- rows -> records
def _to_records(
    rows: Iterable[RawRow],
    *,
    source: str,
    id_prefix: str,
    prompt_field: str,
    label_field: str | None,
    id_field: str | None,
) -> list[PromptRecord]:
    records: list[PromptRecord] = []
    first_seen: dict[str, str] = {}  # prompt id -> where it first appeared
    for row, where, item in rows:
        here = f"{source}: {where}"
        prompt = _field(item, prompt_field, here, "prompt")
        if not isinstance(prompt, str):
            raise DataError(
                f"{here}: prompt field {prompt_field!r} must be a string, got {type(prompt).__name__}"
            )
        label = None
        if label_field is not None:
            label = _scalar_text(_field(item, label_field, here, "label"), here, "label", label_field)
        if id_field is None:
            prompt_id = f"{id_prefix}-{row}"
        else:
            prompt_id = _scalar_text(_field(item, id_field, here, "id"), here, "id", id_field)
            if prompt_id in first_seen:
                raise DataError(
                    f"{here}: duplicate prompt id {prompt_id!r} (first at {first_seen[prompt_id]}); "
                    "ids must be unique for per-prompt tracking and resume"
                )
            first_seen[prompt_id] = where
        used = {prompt_field, label_field, id_field}
        metadata = {key: value for key, value in item.items() if key not in used}
        records.append(PromptRecord(prompt_id, prompt, label, metadata))
    return records


def _field(item: dict[str, Any], name: str, here: str, role: str) -> Any:
    """``item[name]``; a missing or null value is an error that lists the fields present."""
    value = item.get(name)
    if value is None:
        present = ", ".join(sorted(k for k, v in item.items() if v is not None)) or "none"
        hint = "; set label_field: null if the data has no labels" if role == "label" else ""
        raise DataError(f"{here}: no {role} field {name!r} (fields present: {present}){hint}")
    return value


def _scalar_text(value: Any, here: str, role: str, name: str) -> str:
    # JSON numbers become text ("42", "0.5"): labels are compared as extracted answer strings.
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(
            f"{here}: {role} field {name!r} must be a string or a number, got {type(value).__name__}"
        )
    return str(value)
