"""Where training and evaluation prompts come from, and how they are templated (`data`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from urlvr.recipe.names import Registered
from urlvr.section import Section


class FileSource(Section):
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


class DatasetsSource(Section):
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


class AdapterSource(Section):
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


class ArithmeticSource(Section):
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


class CountdownSource(Section):
    kind: Literal["countdown"] = "countdown"
    num_problems: int = Field(256, ge=1, le=10_000_000)
    """How many synthetic Countdown problems (numbers + target) to generate."""
    seed: int = 0
    """Generator seed."""


class ReasoningGymSource(Section):
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


DataSource = Annotated[
    Union[FileSource, DatasetsSource, AdapterSource, ArithmeticSource, CountdownSource, ReasoningGymSource],
    Field(discriminator="kind"),
]


class DataSection(Section):
    source: DataSource = Field(default_factory=ArithmeticSource)
    """Where prompts come from; `kind` picks the variant: file | datasets | adapter | arithmetic | countdown | reasoning_gym."""
    template: str = "chat"
    """`chat` = the tokenizer's chat template; anything else is a plain format string with a
    single `{prompt}` field, e.g. `"Question: {prompt}\\nAnswer:"`."""
    system_prompt: str | None = None
    """Optional system message (chat template only)."""
    prompt_suffix: str = ""
    """Text appended to every question, e.g. an instruction to box the final answer."""
    max_prompt_length: int = Field(1024, ge=1)
    """Longest prompt in tokens (Table 7: 1024)."""
    on_long_prompt: Literal["error", "skip"] = "error"
    """What to do with a longer prompt: stop with an error naming it, or skip it (counted in the log)."""
    shuffle: bool = True
    """Shuffle prompts each epoch (seeded by the recipe's seed)."""
