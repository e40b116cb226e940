"""Dataset adapters: the paper's datasets by name, so a recipe says `dataset: dapo-17k`, not a schema.

Each public dataset stores its question, answer and extras under its own column names (DAPO nests
the question in a chat message wrapped in DAPO's own "Answer:" instruction; AMC 2023 stores answers
as floats; Countdown has no question at all, only `nums` and `target`). An adapter records, once,
what a recipe would otherwise have to get right by hand for every run:

    hub id and split -> rows -> question (dotted field path, wrapper text removed)
                             -> label (dotted field path, normalised to the string an extractor yields)
                             -> metadata (e.g. Countdown's numbers and target, for its rewards)
                     -> prompt = the paper's template filled with {question} and the metadata

A recipe names an adapter with `data.source: {kind: adapter, dataset: NAME}` (also usable as
`eval.source` and in `eval.held_out`). `path` points the same adapter at a local mirror in the hub
schema (a .jsonl/.json/.parquet file, or a directory) -- the tests' fixtures, or an offline copy.
Adapters live in a registry: a plugin adds one with `DATASET_ADAPTERS.register(name)(DatasetAdapter(...))`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from urlvr.data.readers import open_dataset, read_file_rows
from urlvr.data.records import DataError, PromptRecord
from urlvr.registry import Registry


def numeric_answer(value: Any) -> str:
    """Labels of integer-answer sets (AIME, AMC, DAPO, Countdown targets): `142.0` -> `142`, `033` -> `33`.

    math-ai/amc23 stores answers as floats; a float label would never equal the `142` an extractor
    reads from `\\boxed{142}`. Non-integral values are kept as written."""
    if isinstance(value, bool):
        raise DataError(f"answer {value!r} is a boolean, not a number")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if math.isfinite(number) and number.is_integer() and "e" not in text.lower() else text


def latex_answer(value: Any) -> str:
    """Labels written in LaTeX (MATH-500): surrounding whitespace and `$...$` removed, otherwise verbatim;
    symbolic equivalence (`\\frac12` vs `0.5`) is the `math_verify` reward's job, not the loader's."""
    text = str(value).strip()
    if len(text) > 1 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    return text


@dataclass(frozen=True)
class DatasetAdapter:
    """How one public dataset becomes PromptRecords. Field paths are dotted (`prompt.0.content`)."""

    hub_id: str  # the `datasets` id it is read from on a networked machine
    split: str
    answer_field: str  # the ground-truth answer; feeds metrics and oracle rewards only
    normalise_answer: Callable[[Any], str]
    template: str  # the paper's prompt: a format string over {question} and the metadata keys
    question_field: str | None = None  # None: the prompt is built from the metadata alone (Countdown)
    subset: str | None = None
    id_field: str | None = None  # a stable id column; None: `<adapter name>-<row>`
    metadata_fields: Mapping[str, str] = field(default_factory=dict)  # record key -> field path
    strip_prefix: str = ""  # wrapper text around the question in the hub copy, removed when present
    strip_suffix: str = ""
    dedupe: bool = False  # drop rows whose question was already seen (first one wins)
    source: str = ""  # where the schema was checked, and the paper section that uses it

    @property
    def description(self) -> str:
        """One line for `urlvr list`: the hub dataset, its split and subset."""
        return f"{self.hub_id} (split {self.split}{f', subset {self.subset}' if self.subset else ''})"


DATASET_ADAPTERS: Registry[DatasetAdapter] = Registry("dataset adapter")

# The hub copy of DAPO-Math-17k wraps every problem in DAPO's own answer-format instruction; the
# URLVR paper's released data (PRIME-RL/TTRL, verl/data/DAPO/train.json) is the bare problem.
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
# The paper's released data preparation (PRIME-RL/TTRL verl/data/preprocess.py) sends the bare
# problem as the one user message; the model's chat template (recipe `data.template: chat`) does the rest.
BARE_QUESTION = "{question}"
# TinyZero's Countdown question (the paper's §7 uses TinyZero's Countdown data and scorer); the base
# model's conversation frame around it belongs to the recipe's `data.template`.
COUNTDOWN_QUESTION = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)

DATASET_ADAPTERS.register("dapo-17k")(DatasetAdapter(
    hub_id="BytedTsinghua-SIA/DAPO-Math-17k", split="train", question_field="prompt.0.content",
    answer_field="reward_model.ground_truth", normalise_answer=numeric_answer, template=BARE_QUESTION,
    strip_prefix=DAPO_PREFIX, strip_suffix=DAPO_SUFFIX,
    dedupe=True,  # the hub copy repeats its ~17.4k problems about 100 times (BytedTsinghua-SIA/DAPO#36)
    source="training set of §4-§6; hub dataset card: data_source, prompt[{content, role}], ability, "
           "reward_model{ground_truth, style}, extra_info{index}",
))
DATASET_ADAPTERS.register("math-500")(DatasetAdapter(
    hub_id="HuggingFaceH4/MATH-500", split="test", question_field="problem", answer_field="answer",
    normalise_answer=latex_answer, template=BARE_QUESTION, id_field="unique_id",
    source="§4.2 per-problem analysis; columns problem, solution, answer, subject, level, unique_id",
))
DATASET_ADAPTERS.register("aime-2024")(DatasetAdapter(
    hub_id="HuggingFaceH4/aime_2024", split="train", question_field="problem", answer_field="answer",
    normalise_answer=numeric_answer, template=BARE_QUESTION, id_field="id",
    source="evaluation (§4.1) and Table 9; 30 problems of AIME 2024 I+II from AI-MO/aimo-validation-aime; "
           "columns id, problem, solution, answer, url, year",
))
DATASET_ADAPTERS.register("aime-2025")(DatasetAdapter(
    hub_id="math-ai/aime25", split="test", question_field="problem", answer_field="answer",
    normalise_answer=numeric_answer, template=BARE_QUESTION, id_field="id",
    source="evaluation (§4.1); columns problem, answer, id",
))
DATASET_ADAPTERS.register("amc-2023")(DatasetAdapter(
    hub_id="math-ai/amc23", split="test", question_field="question", answer_field="answer",
    normalise_answer=numeric_answer, template=BARE_QUESTION, id_field="id",
    source="evaluation (§4.1) and test-time training (§5.2); 40 problems; columns id, question, "
           "answer (float), url",
))
DATASET_ADAPTERS.register("countdown-3to4")(DatasetAdapter(
    hub_id="Jiayi-Pan/Countdown-Tasks-3to4", split="train", answer_field="target",
    normalise_answer=numeric_answer, template=COUNTDOWN_QUESTION,
    metadata_fields={"numbers": "nums", "target": "target"},  # what the countdown/self_verification rewards read
    source="§7 (self-verification); columns target, nums; the label is the target (the countdown oracle "
           "reads numbers and target from the metadata)",
))


def load_adapter_records(
    dataset: str,
    *,
    path: str | Path | None = None,
    split: str | None = None,
    limit: int | None = None,
    sample_size: int | None = None,
    sample_seed: int = 0,
    sample_offset: int = 0,
) -> list[PromptRecord]:
    """Records of the dataset adapted as ``dataset``, from the hub or from the local mirror ``path``.

    ``limit`` keeps the first N (deduplicated) rows; ``sample_size`` draws N rows without replacement
    after a ``sample_seed``-seeded shuffle, skipping the first ``sample_offset`` of the shuffled order
    (so subsets drawn with one seed at non-overlapping offsets are disjoint: train and validation)."""
    adapter = DATASET_ADAPTERS.get(dataset)
    if limit is not None and sample_size is not None:
        raise DataError(f"dataset {dataset!r}: give limit or sample_size, not both")
    where = str(path) if path is not None else adapter.hub_id
    rows = _read_rows(adapter, path, split or adapter.split)
    records = list(_adapt(adapter, dataset, rows, where, stop_after=None if sample_size else limit))
    if sample_size is not None:
        order = list(range(len(records)))
        random.Random(sample_seed).shuffle(order)
        chosen = order[sample_offset: sample_offset + sample_size]
        if len(chosen) < sample_size:
            raise DataError(f"{where}: asked for {sample_size} rows from offset {sample_offset} but the dataset "
                            f"{dataset!r} has {len(records)}")
        records = [records[i] for i in chosen]
    return records


def _read_rows(adapter: DatasetAdapter, path: str | Path | None, split: str) -> Iterable[dict[str, Any]]:
    """Rows in the hub schema: a local file, a local directory (`datasets`), or the hub itself."""
    if path is not None and Path(path).is_file():
        return (item for _, _, item in read_file_rows(Path(path)))
    return open_dataset(str(path) if path is not None else adapter.hub_id, split=split,
                        subset=None if path is not None else adapter.subset)


def _adapt(adapter: DatasetAdapter, name: str, rows: Iterable[dict[str, Any]], where: str,
           stop_after: int | None) -> Iterator[PromptRecord]:
    seen_questions: set[str] = set()
    seen_ids: dict[str, int] = {}
    kept = 0
    for row, item in enumerate(rows):
        if stop_after is not None and kept >= stop_after:
            return
        here = f"{where}: row {row}"
        metadata = {key: _get(item, path, here) for key, path in adapter.metadata_fields.items()}
        question = None
        if adapter.question_field is not None:
            question = _text(_get(item, adapter.question_field, here), here, adapter.question_field)
            question = question.removeprefix(adapter.strip_prefix).removesuffix(adapter.strip_suffix)
            if adapter.dedupe:
                if question in seen_questions:
                    continue
                seen_questions.add(question)
        label = adapter.normalise_answer(_get(item, adapter.answer_field, here))
        prompt_id = f"{name}-{kept}"
        if adapter.id_field is not None:
            prompt_id = f"{name}-{_text(_get(item, adapter.id_field, here), here, adapter.id_field, scalar=True)}"
            if prompt_id in seen_ids:
                raise DataError(f"{here}: duplicate id {prompt_id!r} (first at row {seen_ids[prompt_id]})")
            seen_ids[prompt_id] = row
        prompt = adapter.template.format_map({"question": question, **metadata})
        yield PromptRecord(prompt_id, prompt, label, metadata)
        kept += 1


def _get(item: Any, path: str, here: str) -> Any:
    """``item`` at the dotted ``path``; list elements by index. A missing value lists what is there."""
    value = item
    for part in path.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            present = ", ".join(sorted(value)) if isinstance(value, Mapping) else type(value).__name__
            raise DataError(f"{here}: no field {path!r} (at {part!r}; present: {present}); "
                            "is this file in the dataset's hub schema?")
    if value is None:
        raise DataError(f"{here}: field {path!r} is null")
    return value


def _text(value: Any, here: str, path: str, scalar: bool = False) -> str:
    if isinstance(value, str) or (scalar and isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise DataError(f"{here}: field {path!r} must be a string, got {type(value).__name__}")

