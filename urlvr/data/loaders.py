"""Data sources: each one a registered recipe section (`data.source`, `eval.source`, `eval.held_out`)
and the loader that turns it into PromptRecords, side by side: a local file, a `datasets` dataset, a
named paper dataset (through its adapter), or a synthetic generator. A plugin adds a source the same
way (docs/writing-data-sources.md): a `DataSourceSection` registered under its `kind`, with its knobs
and a `read` whose keyword arguments are those knobs.

The trainer calls ``recipe.data.source.load()``; ``load_records(kind, **options)`` reads any
registered source by name without a recipe.
Bad data fails here, before step 1, with a `DataError` naming the file and the row or line:
rows count from 0 (the number that ends a default prompt id, ``<stem>-<row>``); JSONL errors
give instead the 1-based line number an editor shows.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from urlvr.data import synthetic
from urlvr.data.adapters import load_adapter_records
from urlvr.data.readers import open_dataset, read_file_rows, rows_to_records
from urlvr.data.reasoning_gym import reasoning_gym_problems
from urlvr.data.records import DataError, PromptRecord
from urlvr.recipe.names import Registered
from urlvr.registry import Registry
from urlvr.section import RegisteredSection, check_variant_name


class DataSourceSection(RegisteredSection):
    """Base of a data source's section: `kind` is the registered name (`kind: Literal["<name>"] =
    "<name>"`), every other field a knob with a docstring. `read(**knobs)` -- a static method whose
    keyword arguments are exactly those knobs -- returns the prompts (a non-empty list of
    PromptRecords; a label is metrics and oracle rewards only). Bad data raises `DataError`."""

    variant_key: ClassVar[str] = "kind"  # not `name`: the `datasets` source has a knob of that name
    kind: str

    @staticmethod
    def read(**knobs: Any) -> list[PromptRecord]:
        raise NotImplementedError

    def load(self) -> list[PromptRecord]:
        """This source's prompts (`load_records` with this section's knobs)."""
        return _read(type(self), self.kind, self.model_dump(exclude={"kind"}))


def _check_source(entry: type[DataSourceSection], name: str) -> None:
    """Registration-time: the section carries its name, and `read` takes every knob (a knob it
    does not take would fail at the first load, or with `**` be ignored)."""
    check_variant_name(entry, name)
    if not (isinstance(entry, type) and issubclass(entry, DataSourceSection)):
        raise TypeError(f"{entry!r}: a data source is a DataSourceSection")
    params = inspect.signature(entry.read).parameters
    untaken = sorted(set(entry.model_fields) - {"kind"} - {p for p, v in params.items() if v.kind != v.VAR_KEYWORD})
    if untaken or any(v.kind == v.VAR_KEYWORD for v in params.values()):
        raise ValueError(f"data source {name!r}: read() must take each knob by name, not as **kwargs "
                         f"(missing: {', '.join(untaken) or 'none'})")
    unfed = sorted(p for p, v in params.items() if p not in entry.model_fields and v.default is v.empty
                   and v.kind != v.VAR_POSITIONAL)
    if unfed:  # checked here once, so each load needs no signature check of its own
        raise ValueError(f"data source {name!r}: read() requires {', '.join(unfed)}, which is no knob of its section")


DATA_SOURCES: Registry[type[DataSourceSection]] = Registry("data source", check=_check_source)


def load_records(kind: str, **options: Any) -> list[PromptRecord]:
    """Load prompts from the data source registered as ``kind`` (file | datasets | adapter |
    arithmetic | countdown | reasoning_gym | a plugin's); ``options`` are that source's knobs, validated
    by its section as a recipe's are (bounds, types, defaults), so `num_problems="3"` is a DataError
    naming the knob, not a TypeError from inside `read`."""
    source = DATA_SOURCES.get(kind)
    unknown = [key for key in options if key not in source.model_fields or key == source.variant_key]
    if unknown:
        raise DataError(f"data source {kind!r}: got an unexpected keyword argument {unknown[0]!r}")
    try:
        section = source.model_validate({**options, source.variant_key: kind})
    except ValidationError as err:
        problem = err.errors()[0]
        where = ".".join(map(str, problem["loc"])) or "options"
        raise DataError(f"data source {kind!r}: {where}: {problem['msg']}") from None
    return section.load()


def _read(source: type[DataSourceSection], kind: str, options: dict[str, Any]) -> list[PromptRecord]:
    # `options` are the section's knobs, each of which `read` takes (checked at registration)
    try:
        records = source.read(**options)
    except DataError:
        raise
    except Exception as err:  # a plugin's bug or a missing file: one line naming the source, not a bare KeyError
        raise DataError(f"data source {kind!r}: read failed: {type(err).__name__}: {err}") from err
    return checked_records(records, kind, options)


def checked_records(records: Any, kind: str, options: dict[str, Any]) -> list[PromptRecord]:
    """`records` as a list, checked as the trainer needs it: non-empty, every item a PromptRecord,
    each `prompt_id` once (per-prompt tracking, evaluation and resume key on it). DataError naming
    the source and the first bad item (its index) otherwise."""
    if records is None or isinstance(records, (str, bytes, dict)):
        records = [] if records is None else [records]
    try:
        records = list(records)
    except TypeError:
        raise DataError(f"data source {kind!r}: read() returned a {type(records).__name__}, "
                        "not a list of PromptRecords") from None
    if not records:
        raise DataError(f"data source {kind!r} gave no prompts (options: {options})")
    first: dict[str, int] = {}
    for i, record in enumerate(records):
        if not isinstance(record, PromptRecord):
            raise DataError(f"data source {kind!r}: read() item {i} is a {type(record).__name__}, not a "
                            "urlvr.data.records.PromptRecord")
        if record.prompt_id in first:
            raise DataError(f"data source {kind!r}: duplicate prompt id {record.prompt_id!r} (items "
                            f"{first[record.prompt_id]} and {i}); ids must be unique for per-prompt tracking and resume")
        first[record.prompt_id] = i
    return records


# --------------------------------------------------------------------------- files
@DATA_SOURCES.register("file")
class FileSource(DataSourceSection):
    """A local .jsonl, .json or .parquet file of prompts, one row each."""

    kind: Literal["file"] = "file"
    path: Path
    """A local .jsonl, .json or .parquet file of prompts."""
    prompt_field: str = "prompt"
    """Column holding the question."""
    label_field: str | None = "answer"
    """Column holding the ground-truth answer, or null. Labels feed metrics and oracle rewards
    only, never the training signal unless the recipe names an oracle reward."""
    id_field: str | None = None
    """Column with a stable prompt id; default `<file stem>-<row>`."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N rows."""

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Path) -> Path:
        if not path.is_file():
            raise ValueError(f"file not found: {path}")
        return path

    @staticmethod
    def read(path: str | Path, prompt_field: str = "prompt", label_field: str | None = "answer",
             id_field: str | None = None, limit: int | None = None) -> list[PromptRecord]:
        return load_records_from_file(path, prompt_field=prompt_field, label_field=label_field,
                                      id_field=id_field, limit=limit)


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
    return rows_to_records(
        read_file_rows(path, limit),
        source=str(path),
        id_prefix=path.stem,
        prompt_field=prompt_field,
        label_field=label_field,
        id_field=id_field,
    )



# --------------------------------------------------------------------------- datasets
@DATA_SOURCES.register("datasets")
class DatasetsSource(DataSourceSection):
    """A dataset from the Hugging Face hub (or a local folder) through `datasets.load_dataset`."""

    kind: Literal["datasets"] = "datasets"
    name: str
    """A `datasets` hub id (networked machines) or a local directory (save_to_disk or data files)."""
    split: str = "train"
    """Split to read."""
    subset: str | None = None
    """Dataset configuration name, if any."""
    prompt_field: str = "prompt"
    """Column holding the question."""
    label_field: str | None = "answer"
    """Column holding the ground-truth answer, or null (metrics and oracle rewards only)."""
    id_field: str | None = None
    """Column with a stable prompt id; default `<name>-<row>`."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N rows."""

    @staticmethod
    def read(name: str, split: str = "train", subset: str | None = None, prompt_field: str = "prompt",
             label_field: str | None = "answer", id_field: str | None = None,
             limit: int | None = None) -> list[PromptRecord]:
        """The recipe calls the dataset `name`; the loader's own argument says what it accepts."""
        return load_records_from_datasets(name, split=split, subset=subset, prompt_field=prompt_field,
                                          label_field=label_field, id_field=id_field, limit=limit)


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
    return rows_to_records(
        rows,
        source=name_or_path,
        id_prefix=local.name if local.exists() else name_or_path,
        prompt_field=prompt_field,
        label_field=label_field,
        id_field=id_field,
    )


# --------------------------------------------------------------------------- named datasets
@DATA_SOURCES.register("adapter")
class AdapterSource(DataSourceSection):
    """A paper dataset by name (dapo-17k, aime-2024, ...), read through its registered adapter."""

    kind: Literal["adapter"] = "adapter"
    dataset: Annotated[str, Registered("dataset_adapter")]
    """A paper dataset by its adapter's name (docs/datasets.md; plugins may add more). The adapter knows the hub id, split,
    question and answer fields, answer normalisation and the paper's prompt template."""
    path: str | None = None
    """A local copy in the hub schema instead of the hub: a .jsonl/.json/.parquet file or a
    `datasets` directory (offline mirrors, test fixtures); null = download the adapter's hub id."""
    split: str | None = None
    """Split to read; null = the adapter's (a local file has only one)."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N rows (after the adapter's de-duplication)."""
    sample_size: int | None = Field(None, ge=1)
    """Draw N rows at random without replacement instead (paper §5.1's DAPO subsets, §7's 4k/1k
    Countdown split); null = all rows."""
    sample_seed: int = 0
    """Seed of the shuffle that `sample_size` draws from (needs `sample_size`)."""
    sample_offset: int = Field(0, ge=0)
    """Skip this many rows of the shuffled order first: the same seed with non-overlapping offsets
    gives disjoint subsets (e.g. train = offset 0, validation = offset 4000)."""

    @field_validator("path")
    @classmethod
    def _exists(cls, path: str | None) -> str | None:
        if path is not None and not Path(path).exists():
            raise ValueError(f"path not found: {path}")
        return path

    @model_validator(mode="after")
    def _one_way_to_subset(self) -> AdapterSource:
        if self.limit is not None and self.sample_size is not None:
            raise ValueError("give limit or sample_size, not both")
        if self.sample_offset and self.sample_size is None:
            raise ValueError("sample_offset needs sample_size")
        if self.sample_seed and self.sample_size is None:
            raise ValueError("sample_seed seeds the draw of sample_size rows, which is null: set sample_size or drop it")
        return self

    @staticmethod
    def read(dataset: str, path: str | None = None, split: str | None = None, limit: int | None = None,
             sample_size: int | None = None, sample_seed: int = 0, sample_offset: int = 0) -> list[PromptRecord]:
        return load_adapter_records(dataset, path=path, split=split, limit=limit, sample_size=sample_size,
                                    sample_seed=sample_seed, sample_offset=sample_offset)


# --------------------------------------------------------------------------- synthetic
@DATA_SOURCES.register("arithmetic")
class ArithmeticSource(DataSourceSection):
    """Synthetic two-operand arithmetic problems with their answers (the quickstart's)."""

    kind: Literal["arithmetic"] = "arithmetic"
    num_problems: int = Field(256, ge=1, le=10_000_000)
    """How many synthetic two-operand arithmetic problems to generate."""
    seed: int = 0
    """Generator seed (the tiny model's warm-up used a different one: these are held out)."""
    min_value: int = Field(0, ge=0, le=10**9)
    """Smallest operand (inclusive)."""
    max_value: int = Field(99, ge=0, le=10**9)
    """Largest operand (inclusive); 9 with `min_value: 0` gives single-digit problems, the ones a
    135M-parameter chat model answers about half the time (docs/real-models.md)."""
    operators: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+", "-"], min_length=1)
    """Operators drawn uniformly per problem."""

    @model_validator(mode="after")
    def _operand_range(self):
        if self.min_value > self.max_value:
            raise ValueError(f"min_value ({self.min_value}) > max_value ({self.max_value})")
        return self

    @staticmethod
    def read(num_problems: int, seed: int, min_value: int = 0, max_value: int = 99,
             operators: tuple[str, ...] = ("+", "-")) -> list[PromptRecord]:
        return synthetic.arithmetic_problems(num_problems, seed, min_value=min_value, max_value=max_value,
                                             operators=operators)


@DATA_SOURCES.register("countdown")
class CountdownSource(DataSourceSection):
    """Synthetic Countdown problems: reach a target with the given numbers."""

    kind: Literal["countdown"] = "countdown"
    num_problems: int = Field(256, ge=1, le=10_000_000)
    """How many synthetic Countdown problems (numbers + target) to generate."""
    seed: int = 0
    """Generator seed."""

    @staticmethod
    def read(num_problems: int, seed: int) -> list[PromptRecord]:
        return synthetic.countdown_problems(num_problems, seed)


@DATA_SOURCES.register("reasoning_gym")
class ReasoningGymSource(DataSourceSection):
    """Procedurally generated reasoning-gym tasks, scored by each task's own checker."""

    kind: Literal["reasoning_gym"] = "reasoning_gym"
    tasks: list[str] = Field(min_length=1)
    """reasoning-gym task names, e.g. [countdown, basic_arithmetic] (needs the `reasoning-gym`
    extra; generated locally, no download). Score them with the `reasoning_gym` reward."""
    size: int = Field(256, ge=1, le=10_000_000)
    """Problems per task."""
    seed: int = 0
    """Generator seed (task i uses seed + i)."""
    config: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Generator settings per task name, e.g. `{countdown: {min_numbers: 3, max_numbers: 3}}`."""

    @model_validator(mode="after")
    def _config_names_tasks(self) -> ReasoningGymSource:
        unknown = sorted(set(self.config) - set(self.tasks))
        if unknown:
            raise ValueError(f"config names tasks that are not in `tasks`: {', '.join(unknown)}")
        return self

    @staticmethod
    def read(tasks: list[str], size: int, seed: int, config: dict | None = None) -> list[PromptRecord]:
        return reasoning_gym_problems(tasks, size, seed, config)
