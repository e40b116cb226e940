"""Raw rows of prompt files and `datasets` datasets, shared by the generic loaders
(`loaders.py`) and the paper-dataset adapters (`adapters.py`), which read nested fields; and
`rows_to_records`, which turns the generic loaders' flat rows into PromptRecords.

Failures are `DataError`s naming the file and the row or line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from urlvr.data.records import DataError, PromptRecord

# A raw row, with where it came from for error messages: (row index, "row 3" / "line 4", fields).
RawRow = tuple[int, str, dict[str, Any]]


def read_file_rows(path: Path, limit: int | None = None) -> Iterator[RawRow]:
    """The raw rows of a ``.jsonl``, ``.json`` or ``.parquet`` file (the dataset adapters read
    nested fields from them); a missing file or an unknown suffix is a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .json or .parquet)"
        )
    return reader(path, limit)


def _read_jsonl(path: Path, limit: int | None) -> Iterator[RawRow]:
    row = 0
    with path.open(encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if limit is not None and row >= limit:  # don't parse (or fail on) rows never used
                return
            where = f"line {line_no}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: {where}: not valid JSON ({err.msg})") from None
            yield row, where, _as_object(value, path, where)
            row += 1


def _read_json(path: Path, limit: int | None) -> Iterator[RawRow]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(
            f'{path}: expected a JSON list of objects or {{"data": [...]}}, '
            f"got {type(value).__name__}"
        )
    for row, item in enumerate(value[:limit]):
        yield row, f"row {row}", _as_object(item, path, f"row {row}")


def _read_parquet(path: Path, limit: int | None) -> Iterator[RawRow]:
    import pyarrow.parquet as pq  # heavy-ish (datasets' dependency), loaded on demand: only for .parquet files

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    if limit is not None:
        table = table.slice(0, limit)
    for row, item in enumerate(table.to_pylist()):
        yield row, f"row {row}", item


def _as_object(value: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{path}: {where}: expected a JSON object, got {type(value).__name__}")
    return value


def open_dataset(name_or_path: str, *, split: str = "train", subset: str | None = None):
    """One split of a `datasets` dataset (save_to_disk directory, local data file or directory,
    or hub id); what cannot be loaded is a DataError naming it."""
    import datasets  # heavy (seconds), loaded on demand: only for a datasets source

    local = Path(name_or_path)
    try:
        if _saved_to_disk(local):
            if subset is not None:
                raise DataError(f"{local}: subset {subset!r} does not apply to a save_to_disk directory")
            dataset = datasets.load_from_disk(str(local))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise DataError(
                        f"{local}: no split {split!r} (splits: {', '.join(sorted(dataset))})"
                    )
                dataset = dataset[split]
        elif local.is_file():
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
            dataset = datasets.load_dataset(
                builder.get(local.suffix.lower(), local.suffix.lstrip(".")),
                data_files=str(local),
                split=split,
            )
        else:
            dataset = datasets.load_dataset(name_or_path, subset, split=split)
    except DataError:
        raise
    except (FileNotFoundError, ConnectionError, ValueError) as err:  # not found, offline, no split
        raise DataError(f"{name_or_path}: datasets could not load it ({err})") from err
    return dataset


def _saved_to_disk(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


# --------------------------------------------------------------------------- rows -> records
def rows_to_records(
    rows: Iterable[RawRow],
    *,
    source: str,
    id_prefix: str,
    prompt_field: str,
    label_field: str | None,
    id_field: str | None,
) -> list[PromptRecord]:
    """Raw rows -> PromptRecords: the prompt, label and id read from the named fields (ids
    `<id_prefix>-<row>` by default, else unique), every other field kept as metadata. A missing
    field, a wrong type or a repeated id is a DataError naming `source` and the row."""
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
