"""Dataset adapters: the paper's datasets by name, read from fixture files in the hub schema (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from urlvr.data.adapters import (
    COUNTDOWN_QUESTION,
    DAPO_PREFIX,
    DAPO_SUFFIX,
    DATASET_ADAPTERS,
    load_adapter_records,
    numeric_answer,
)
from urlvr.data.loaders import load_records
from urlvr.data.records import DataError
from urlvr.recipe import RecipeError, load_recipe

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
PAPER_DATASETS = ["aime-2024", "aime-2025", "amc-2023", "countdown-3to4", "dapo-17k", "math-500"]


def fixture(name: str) -> str:
    return str(FIXTURES / f"{name}.jsonl")


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in Path(fixture(name)).read_text().splitlines()]


def test_every_paper_dataset_has_an_adapter_and_a_fixture():
    assert set(PAPER_DATASETS) <= set(DATASET_ADAPTERS.names())  # plugins (and the docs' example) may add more
    for name in PAPER_DATASETS:
        records = load_adapter_records(name, path=fixture(name))
        assert records and all(r.label for r in records), name


def test_dapo_unwraps_dapo_instruction_and_drops_the_hub_copys_duplicates():
    raw = rows("dapo-17k")
    assert raw[0]["prompt"][0]["content"].startswith(DAPO_PREFIX) and raw[0]["prompt"][0]["content"].endswith(DAPO_SUFFIX)
    records = load_adapter_records("dapo-17k", path=fixture("dapo-17k"))
    assert len(raw) == 6 and len(records) == 4  # rows 3 and 4 repeat rows 0 and 1
    first = raw[0]["prompt"][0]["content"][len(DAPO_PREFIX):-len(DAPO_SUFFIX)]
    assert records[0].prompt == first == "Determine the smallest prime $p$ such that $2018!$ is divisible by $p^3$, but not divisible by $p^4$."
    assert [r.prompt_id for r in records] == ["dapo-17k-0", "dapo-17k-1", "dapo-17k-2", "dapo-17k-3"]
    assert [r.label for r in records] == ["509", "64", "10", "10"]
    assert "Answer:" not in "".join(r.prompt for r in records)


def test_answers_are_normalised_to_what_an_extractor_reads():
    amc = load_adapter_records("amc-2023", path=fixture("amc-2023"))
    assert rows("amc-2023")[0]["answer"] == 142.0 and amc[0].label == "142"  # float in the hub copy
    assert [r.prompt_id for r in amc] == ["amc-2023-0", "amc-2023-1", "amc-2023-2"]
    aime = load_adapter_records("aime-2024", path=fixture("aime-2024"))
    assert aime[1].label == "25"  # "025" as AIME writes it
    math = load_adapter_records("math-500", path=fixture("math-500"))
    assert math[1].label == "\\frac{14}{3}" and math[1].prompt_id == "math-500-test/algebra/2584.json"
    assert math[0].metadata == {}  # solutions never travel with the prompt
    assert [numeric_answer(v) for v in (7, 7.0, "7.0", " 033 ", "2.5", "1e3", "\\frac{1}{2}")] == \
        ["7", "7", "7", "33", "2.5", "1e3", "\\frac{1}{2}"]


def test_countdown_builds_tinyzeros_question_and_keeps_numbers_for_the_rewards():
    record = load_adapter_records("countdown-3to4", path=fixture("countdown-3to4"))[0]
    assert record.prompt == COUNTDOWN_QUESTION.format(numbers=[44, 19, 35], target=98)
    assert record.prompt.startswith("Using the numbers [44, 19, 35], create an equation that equals 98.")
    assert record.metadata == {"numbers": [44, 19, 35], "target": 98} and record.label == "98"


def test_sampling_is_seeded_and_offsets_give_disjoint_subsets():
    def ids(**kw):
        return [r.prompt_id for r in load_adapter_records("countdown-3to4", path=fixture("countdown-3to4"), **kw)]

    train, val = ids(sample_size=4, sample_seed=7), ids(sample_size=2, sample_seed=7, sample_offset=4)
    assert not set(train) & set(val) and len(set(train + val)) == 6
    assert ids(sample_size=4, sample_seed=7) == train  # same seed, same subset
    assert ids(sample_size=4, sample_seed=8) != train
    assert ids(limit=2) == ["countdown-3to4-0", "countdown-3to4-1"]
    with pytest.raises(DataError, match="asked for 3 rows from offset 4 but the dataset 'countdown-3to4' has 6"):
        ids(sample_size=3, sample_offset=4)


def test_hub_id_and_split_come_from_the_adapter(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, subset=None, split=None, **kwargs):
        calls.append((name, subset, split))
        fixture_of = {"math-ai/amc23": "amc-2023", "BytedTsinghua-SIA/DAPO-Math-17k": "dapo-17k"}
        return datasets.Dataset.from_list(rows(fixture_of[name]))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_records("adapter", dataset="amc-2023", limit=2)
    assert calls == [("math-ai/amc23", None, "test")]
    assert [r.label for r in records] == ["142", "144"]
    assert len(load_records("adapter", dataset="dapo-17k", split="validation")) == 4  # nested fields via datasets
    assert calls[-1] == ("BytedTsinghua-SIA/DAPO-Math-17k", None, "validation")


def test_a_file_in_the_wrong_schema_names_row_and_field(tmp_path):
    path = tmp_path / "aime.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2", "id": 0}) + "\n")
    with pytest.raises(DataError) as err:
        load_adapter_records("aime-2024", path=path)
    assert str(err.value) == (f"{path}: row 0: no field 'problem' (at 'problem'; present: answer, id, question); "
                              "is this file in the dataset's hub schema?")


def test_recipe_checks_adapter_names_paths_and_subsets():
    with pytest.raises(RecipeError, match="unknown dataset adapter 'dapo17k'; did you mean 'dapo-17k'"):
        load_recipe({"data": {"source": {"kind": "adapter", "dataset": "dapo17k"}}})
    with pytest.raises(RecipeError, match="data.source.adapter.path: path not found: nowhere.jsonl"):
        load_recipe({"data": {"source": {"kind": "adapter", "dataset": "dapo-17k", "path": "nowhere.jsonl"}}})
    with pytest.raises(RecipeError, match="give limit or sample_size, not both"):
        load_recipe({"data": {"source": {"kind": "adapter", "dataset": "dapo-17k", "limit": 2, "sample_size": 2}}})
    recipe = load_recipe({"eval": {"at_end": True,
                                   "source": {"kind": "adapter", "dataset": "aime-2024", "path": fixture("aime-2024")},
                                   "held_out": {"amc": {"kind": "adapter", "dataset": "amc-2023"}}}})
    assert recipe.eval.source.dataset == "aime-2024" and recipe.eval.held_out["amc"].dataset == "amc-2023"
