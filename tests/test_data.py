"""Prompt data: loaders and their error messages, templates, and the resumable prompt stream."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from urlvr.data import (
    DATA_SOURCES,
    DataError,
    PromptRecord,
    PromptStream,
    check_template,
    encode_prompts,
    load_records,
    load_records_from_datasets,
    load_records_from_file,
    render_prompt,
)
from urlvr.registry import UnknownNameError
from urlvr.rollout.base import PromptInput

ROWS = [
    {"prompt": "1+1?", "answer": 2, "source": "a"},
    {"prompt": "2+2?", "answer": "4", "source": "b"},
    {"prompt": "half of 1?", "answer": 0.5, "source": "c"},
]
DATASET_ROWS = [  # one type per column, as Arrow needs
    {"prompt": "1+1?", "answer": 2, "source": "a"},
    {"prompt": "2+2?", "answer": 4, "source": "b"},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --------------------------------------------------------------------------- file round trips
def test_jsonl_round_trip_converts_labels_to_text_and_keeps_other_fields(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", ROWS)
    records = load_records_from_file(path)
    assert records == [
        PromptRecord("math-0", "1+1?", "2", {"source": "a"}),
        PromptRecord("math-1", "2+2?", "4", {"source": "b"}),
        PromptRecord("math-2", "half of 1?", "0.5", {"source": "c"}),
    ]


def test_jsonl_skips_blank_lines_and_reports_editor_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n\n{"prompt": "b", "answer": 2}\n{oops\n')
    with pytest.raises(DataError) as err:
        load_records_from_file(path)
    assert str(err.value) == (
        f"{path}: line 4: not valid JSON (Expecting property name enclosed in double quotes)"
    )
    # the bad line lies past the limit, so it is never parsed; ids count rows, not lines
    records = load_records_from_file(path, limit=2)
    assert [(r.prompt_id, r.prompt, r.label) for r in records] == [("gaps-0", "a", "1"), ("gaps-1", "b", "2")]


@pytest.mark.parametrize("wrap", [lambda rows: rows, lambda rows: {"data": rows}], ids=["list", "data"])
def test_json_list_or_data_object(tmp_path, wrap):
    path = tmp_path / "set.json"
    path.write_text(json.dumps(wrap(ROWS)))
    records = load_records_from_file(path, limit=2)
    assert [(r.prompt_id, r.prompt, r.label) for r in records] == [
        ("set-0", "1+1?", "2"),
        ("set-1", "2+2?", "4"),
    ]


def test_parquet_round_trip_with_ids_and_without_labels(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "qs.parquet"
    pq.write_table(pa.table({"question": ["x?", "y?"], "uid": [7, 9], "answer": [1, 2]}), path)
    records = load_records_from_file(path, prompt_field="question", label_field=None, id_field="uid")
    assert records == [
        PromptRecord("7", "x?", None, {"answer": 1}),
        PromptRecord("9", "y?", None, {"answer": 2}),
    ]
    labelled = load_records_from_file(path, prompt_field="question", limit=1)
    assert labelled == [PromptRecord("qs-0", "x?", "1", {"uid": 7})]


def test_unlabelled_file_loads_with_label_field_null(tmp_path):
    path = write_jsonl(tmp_path / "free.jsonl", [{"prompt": "why?"}])
    assert load_records_from_file(path, label_field=None) == [PromptRecord("free-0", "why?", None, {})]


# --------------------------------------------------------------------------- file errors
def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as err:
        load_records_from_file(path)
    assert str(err.value) == f"{path}: file not found"
    assert isinstance(err.value, ValueError)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text("prompt\nx\n")
    with pytest.raises(DataError) as err:
        load_records_from_file(path)
    assert str(err.value) == f"{path}: unsupported file type '.csv' (use .jsonl, .json or .parquet)"


def test_bad_json_file_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"prompt": "a"},\n {"prompt": }\n]')
    with pytest.raises(DataError) as err:
        load_records_from_file(path)
    assert str(err.value) == f"{path}: line 3: not valid JSON (Expecting value)"


def test_json_of_wrong_shape(tmp_path):
    path = tmp_path / "shape.json"
    path.write_text('{"rows": []}')
    with pytest.raises(DataError) as err:
        load_records_from_file(path)
    assert str(err.value) == f'{path}: expected a JSON list of objects or {{"data": [...]}}, got dict'


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n["b", 2]\n')
    with pytest.raises(DataError) as err:
        load_records_from_file(path)
    assert str(err.value) == f"{path}: line 2: expected a JSON object, got list"


def test_missing_prompt_field_lists_fields_present(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "a", "answer": 1}, {"question": "b", "answer": 2}]))
    with pytest.raises(DataError) as err:
        load_records_from_file(path)
    assert str(err.value) == f"{path}: row 1: no prompt field 'prompt' (fields present: answer, question)"


def test_non_string_prompt(tmp_path):
    path = write_jsonl(tmp_path / "num.jsonl", [{"prompt": 12, "answer": 1}])
    with pytest.raises(DataError) as err:
        load_records_from_file(path)
    assert str(err.value) == f"{path}: line 1: prompt field 'prompt' must be a string, got int"


@pytest.mark.parametrize("second", [{"prompt": "b"}, {"prompt": "b", "answer": None}], ids=["absent", "null"])
def test_label_missing_in_some_rows(tmp_path, second):
    path = write_jsonl(tmp_path / "part.jsonl", [{"prompt": "a", "answer": 1}, second])
    with pytest.raises(DataError) as err:
        load_records_from_file(path)
    assert str(err.value) == (
        f"{path}: line 2: no label field 'answer' (fields present: prompt); "
        "set label_field: null if the data has no labels"
    )
    assert [r.label for r in load_records_from_file(path, label_field=None)] == [None, None]


def test_label_of_wrong_type(tmp_path):
    path = write_jsonl(tmp_path / "lists.jsonl", [{"prompt": "a", "answer": [1, 2]}])
    with pytest.raises(DataError) as err:
        load_records_from_file(path)
    assert str(err.value) == f"{path}: line 1: label field 'answer' must be a string or a number, got list"


def test_missing_and_duplicate_ids(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"prompt": "a", "id": "q1"}, {"prompt": "b"}])
    with pytest.raises(DataError) as err:
        load_records_from_file(path, label_field=None, id_field="id")
    assert str(err.value) == f"{path}: line 2: no id field 'id' (fields present: prompt)"

    path = write_jsonl(tmp_path / "dup.jsonl", [{"prompt": "a", "id": "q1"}, {"prompt": "b", "id": "q1"}])
    with pytest.raises(DataError) as err:
        load_records_from_file(path, label_field=None, id_field="id")
    assert str(err.value) == (
        f"{path}: line 2: duplicate prompt id 'q1' (first at line 1); "
        "ids must be unique for per-prompt tracking and resume"
    )


# --------------------------------------------------------------------------- datasets
def test_datasets_save_to_disk_dir(tmp_path):
    import datasets

    datasets.Dataset.from_list(DATASET_ROWS).save_to_disk(str(tmp_path / "arith"))
    records = load_records_from_datasets(str(tmp_path / "arith"))
    assert records == [
        PromptRecord("arith-0", "1+1?", "2", {"source": "a"}),
        PromptRecord("arith-1", "2+2?", "4", {"source": "b"}),
    ]


def test_datasets_dict_dir_picks_the_split_and_names_missing_ones(tmp_path):
    import datasets

    train = datasets.Dataset.from_list([{"q": "t?", "answer": "1"}])
    test = datasets.Dataset.from_list([{"q": "e?", "answer": "2"}])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    records = load_records_from_datasets(str(tmp_path / "dd"), split="test", prompt_field="q")
    assert records == [PromptRecord("dd-0", "e?", "2", {})]
    with pytest.raises(DataError) as err:
        load_records_from_datasets(str(tmp_path / "dd"), split="valid", prompt_field="q")
    assert str(err.value) == f"{tmp_path / 'dd'}: no split 'valid' (splits: test, train)"


def test_datasets_missing_prompt_column(tmp_path):
    import datasets

    path = str(tmp_path / "cols")
    datasets.Dataset.from_list([{"question": "a", "answer": "1"}]).save_to_disk(path)
    with pytest.raises(DataError) as err:
        load_records_from_datasets(path)
    assert str(err.value) == f"{path}: row 0: no prompt field 'prompt' (fields present: answer, question)"


def test_datasets_local_data_dir_without_network(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    (tmp_path / "raw").mkdir()
    write_jsonl(tmp_path / "raw" / "train.jsonl", DATASET_ROWS)
    records = load_records_from_datasets(str(tmp_path / "raw"), label_field=None)
    assert [(r.prompt_id, r.prompt, r.label) for r in records] == [
        ("raw-0", "1+1?", None),
        ("raw-1", "2+2?", None),
    ]


def test_datasets_missing_local_path_is_a_data_error(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    path = str(tmp_path / "missing")
    with pytest.raises(DataError, match=f"^{path}: datasets could not load it \\(") as err:
        load_records_from_datasets(path)
    assert isinstance(err.value.__cause__, FileNotFoundError)


# --------------------------------------------------------------------------- the source registry
def test_load_records_dispatches_by_kind(tmp_path):
    # urlvr's own sources (a plugin registered by an earlier test in this process may add to them)
    builtin = [name for name in DATA_SOURCES.names() if DATA_SOURCES.get(name).__module__.startswith("urlvr.")]
    assert builtin == ["adapter", "arithmetic", "countdown", "datasets", "file", "reasoning_gym"]
    path = write_jsonl(tmp_path / "k.jsonl", ROWS)
    assert load_records("file", path=path, limit=1) == [PromptRecord("k-0", "1+1?", "2", {"source": "a"})]

    import datasets

    datasets.Dataset.from_list(DATASET_ROWS).save_to_disk(str(tmp_path / "ds"))
    options = {"name": str(tmp_path / "ds"), "split": "train", "subset": None, "prompt_field": "prompt",
               "label_field": "answer", "id_field": None, "limit": 1}  # DatasetsSource's fields
    assert load_records("datasets", **options) == [PromptRecord("ds-0", "1+1?", "2", {"source": "a"})]


def test_load_records_errors(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown data source 'fil'; did you mean 'file'"):
        load_records("fil", path="x.jsonl")
    with pytest.raises(DataError) as err:
        load_records("file", path="x.jsonl", colour="red")
    assert str(err.value) == "data source 'file': got an unexpected keyword argument 'colour'"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"data source 'file' gave no prompts"):
        load_records("file", path=empty)


def test_synthetic_sources_pass_count_and_seed(monkeypatch):
    from urlvr.data import synthetic

    calls = []

    def arithmetic_problems(num_problems, seed, **ranges):
        calls.append(("arithmetic", num_problems, seed, ranges))
        return [PromptRecord("a-0", "1+2", "3")]

    def countdown_problems(num_problems, seed):
        calls.append(("countdown", num_problems, seed))
        return [PromptRecord("c-0", "24?", "24")]

    monkeypatch.setattr(synthetic, "arithmetic_problems", arithmetic_problems)
    monkeypatch.setattr(synthetic, "countdown_problems", countdown_problems)
    assert load_records("arithmetic", num_problems=5, seed=3) == [PromptRecord("a-0", "1+2", "3")]
    assert load_records("countdown", num_problems=2, seed=1) == [PromptRecord("c-0", "24?", "24")]
    assert load_records("arithmetic", num_problems=1, seed=0, max_value=9, operators=["+"])
    # load_records reads through the source's section, as a recipe does: its defaults, as the section dumps them
    assert calls == [("arithmetic", 5, 3, {"min_value": 0, "max_value": 99, "operators": ["+", "-"]}),
                     ("countdown", 2, 1), ("arithmetic", 1, 0, {"min_value": 0, "max_value": 9, "operators": ["+"]})]


# --------------------------------------------------------------------------- templates
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """One token per character, built locally: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ?:+=<>|/{}\n.,!'-"
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_chat_template_with_system_prompt_and_suffix():
    record = PromptRecord("p", "2+2?", "4")
    tokenizer = char_tokenizer()
    text = render_prompt(tokenizer, record, template="chat", system_prompt="Be brief.", suffix=" Box it.")
    assert text == "<|system|>Be brief.\n<|user|>2+2? Box it.\n<|assistant|>"
    assert render_prompt(tokenizer, record, template="chat") == "<|user|>2+2?\n<|assistant|>"


def test_chat_template_missing_is_a_clear_error():
    with pytest.raises(DataError, match="template 'chat' needs a tokenizer with a chat template"):
        render_prompt(char_tokenizer(chat_template=None), PromptRecord("p", "q"), template="chat")


def test_plain_template_formats_prompt_and_suffix_keeping_literal_braces():
    record = PromptRecord("p", "2+2?")
    text = render_prompt(None, record, template="Question: {prompt}\nAnswer in {{}}:", suffix=" (int)")
    assert text == "Question: 2+2? (int)\nAnswer in {}:"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("Q: {question}", "template 'Q: {question}' has fields other than {prompt}: {question} "
         "(write literal braces as {{ and }})"),
        ("{prompt} {}", "template '{prompt} {}' has fields other than {prompt}: {} "
         "(write literal braces as {{ and }})"),
        ("{prompt[0]}", "template '{prompt[0]}' has fields other than {prompt}: {prompt[0]} "
         "(write literal braces as {{ and }})"),
        ("Question:", "template 'Question:' has no {prompt} field (or use 'chat')"),
        ("Q: {prompt", "template 'Q: {prompt' is not a valid format string (expected '}' before end "
         "of string); write literal braces as {{ and }}"),
    ],
)
def test_plain_template_validation(template, message):
    with pytest.raises(DataError) as err:
        check_template(template)
    assert str(err.value) == message
    with pytest.raises(DataError):
        render_prompt(None, PromptRecord("p", "q"), template=template)


def test_system_prompt_needs_the_chat_template():
    with pytest.raises(DataError, match="system_prompt needs the 'chat' template"):
        render_prompt(None, PromptRecord("p", "q"), template="Q: {prompt}", system_prompt="hi")


def test_encode_prompts_tokenizes_without_special_tokens():
    tokenizer = char_tokenizer()
    records = [PromptRecord("a", "ab"), PromptRecord("b", "c")]
    encoded = encode_prompts(tokenizer, records, template="Q:{prompt}", max_prompt_length=4)
    vocab = tokenizer.get_vocab()
    assert encoded.inputs == (
        PromptInput("a", "Q:ab", tuple(vocab[c] for c in "Q:ab")),
        PromptInput("b", "Q:c", tuple(vocab[c] for c in "Q:c")),
    )
    assert encoded.records == tuple(records)
    assert encoded.skipped == 0


@pytest.mark.parametrize(
    ("template", "text"),
    [
        ("Q:{prompt}", "Q:ab"),  # plain: the tokenizer adds BOS, as tokenizer(text) would
        ("<s>Q:{prompt}", "<s>Q:ab"),  # plain template that writes BOS itself: not added twice
        ("chat", "<s><|user|>ab\n<|assistant|>"),  # the chat template writes BOS: not added twice
    ],
)
def test_encode_prompts_has_bos_exactly_once(bos_tokenizer, template, text):
    encoded = encode_prompts(bos_tokenizer, [PromptRecord("a", "ab")], template=template, max_prompt_length=64)
    (prompt,) = encoded.inputs
    assert prompt.text == text
    assert prompt.token_ids[0] == bos_tokenizer.bos_token_id
    assert prompt.token_ids.count(bos_tokenizer.bos_token_id) == 1
    assert bos_tokenizer.decode(prompt.token_ids[1:]) == text.removeprefix("<s>")


def test_long_prompt_is_an_error_naming_it():
    records = [PromptRecord("short", "ab"), PromptRecord("long-7", "abcdef")]
    with pytest.raises(DataError) as err:
        encode_prompts(char_tokenizer(), records, template="{prompt}", max_prompt_length=5)
    assert str(err.value) == (
        "prompt 'long-7' is 6 tokens, over max_prompt_length=5 "
        "(raise it, or set on_long_prompt: skip to drop such prompts)"
    )


def test_long_prompt_skipped_and_counted(caplog):
    records = [PromptRecord("x", "abcdef"), PromptRecord("y", "ab"), PromptRecord("z", "abcdefg")]
    with caplog.at_level(logging.WARNING, logger="urlvr.data.templates"):
        encoded = encode_prompts(
            char_tokenizer(),
            records,
            template="chat",
            suffix="!",
            max_prompt_length=25,
            on_long_prompt="skip",
        )
    # "<|user|>" + prompt + "!" + "\n<|assistant|>": 8 + len + 1 + 1 + 13 tokens; only "ab" fits in 25
    assert [p.prompt_id for p in encoded.inputs] == ["y"]
    assert encoded.inputs[0].text == "<|user|>ab!\n<|assistant|>"
    assert len(encoded.inputs[0].token_ids) == 25
    assert encoded.records == (records[1],)
    assert encoded.skipped_ids == ("x", "z") and encoded.skipped == 2
    assert "skipped 2 of 3 prompts longer than 25 tokens (first: x, z)" in caplog.text


def test_a_prompt_that_fills_the_models_context_is_long_too(caplog):
    """A prompt of `context_length` tokens or more leaves no room for a response (both engines
    would refuse it at its first step): refused or skipped at start-up, by `on_long_prompt`."""
    records = [PromptRecord("fits", "abcd"), PromptRecord("fills", "abcde"), PromptRecord("over", "abcdef")]
    with pytest.raises(DataError) as err:
        encode_prompts(char_tokenizer(), records, template="{prompt}", max_prompt_length=100, context_length=5)
    assert str(err.value) == (
        "prompt 'fills' is 5 tokens, which fill the model's context length of 5 (config.max_position_embeddings) "
        "and leave no room for a response (set on_long_prompt: skip to drop such prompts)"
    )
    with caplog.at_level(logging.WARNING, logger="urlvr.data.templates"):
        encoded = encode_prompts(char_tokenizer(), records, template="{prompt}", max_prompt_length=100,
                                 context_length=5, on_long_prompt="skip")
    assert [p.prompt_id for p in encoded.inputs] == ["fits"] and encoded.skipped_ids == ("fills", "over")
    assert "skipped 2 of 3 prompts longer than 4 tokens (first: fills, over)" in caplog.text
    # max_prompt_length binding first keeps its own message
    with pytest.raises(DataError, match="over max_prompt_length=3"):
        encode_prompts(char_tokenizer(), records, template="{prompt}", max_prompt_length=3, context_length=5)


# --------------------------------------------------------------------------- the prompt stream
def numbered(count: int) -> list[PromptRecord]:
    return [PromptRecord(f"p{i}", f"question {i}") for i in range(count)]


def ids(batch: list[PromptRecord]) -> list[str]:
    return [record.prompt_id for record in batch]


def test_stream_without_shuffle_walks_in_order_and_wraps_across_epochs():
    stream = PromptStream(numbered(5), prompts_per_step=2, seed=0, shuffle=False)
    assert [ids(stream.next_batch()) for _ in range(4)] == [
        ["p0", "p1"], ["p2", "p3"], ["p4", "p0"], ["p1", "p2"],  # batch 3 spans the epoch boundary
    ]
    assert (stream.epoch, stream.offset, stream.steps_taken) == (1, 3, 4)


def test_stream_shuffles_each_epoch_deterministically():
    records = numbered(8)
    first = PromptStream(records, prompts_per_step=8, seed=3)
    again = PromptStream(records, prompts_per_step=8, seed=3)
    other_seed = PromptStream(records, prompts_per_step=8, seed=4)
    epochs = [ids(first.next_batch()) for _ in range(3)]
    assert epochs == [ids(again.next_batch()) for _ in range(3)]
    assert all(sorted(epoch) == sorted(ids(records)) for epoch in epochs)  # each a permutation
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh order every epoch
    assert epochs[0] != ids(other_seed.next_batch())
    assert epochs[0] != ids(records)


def test_stream_global_order_does_not_depend_on_world_size():
    records = numbered(7)
    single = PromptStream(records, prompts_per_step=4, seed=11)
    ranks = [PromptStream(records, prompts_per_step=4, seed=11, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        whole = ids(single.next_batch())
        shards = [ids(stream.next_batch()) for stream in ranks]
        assert shards == [whole[:2], whole[2:]]  # contiguous, disjoint, union == the global batch


def test_stream_rank_sharding_four_ways():
    records = numbered(10)
    reference = PromptStream(records, prompts_per_step=8, seed=5, world_size=1)
    ranks = [PromptStream(records, prompts_per_step=8, seed=5, rank=r, world_size=4) for r in range(4)]
    for _ in range(3):
        whole = ids(reference.next_batch())
        shards = [ids(stream.next_batch()) for stream in ranks]
        assert [len(shard) for shard in shards] == [2, 2, 2, 2]
        assert sum(shards, []) == whole


def test_stream_shards_a_batch_the_world_size_does_not_divide():
    """30 prompts on 8 ranks: 4,4,4,4,4,4,3,3, contiguous, in the single-rank order."""
    records = numbered(40)
    reference = PromptStream(records, prompts_per_step=30, seed=5)
    ranks = [PromptStream(records, prompts_per_step=30, seed=5, rank=r, world_size=8) for r in range(8)]
    for _ in range(3):  # the second batch spans an epoch boundary
        whole = ids(reference.next_batch())
        shards = [ids(stream.next_batch()) for stream in ranks]
        assert [len(shard) for shard in shards] == [4, 4, 4, 4, 4, 4, 3, 3]
        assert sum(shards, []) == whole
    three = [PromptStream(numbered(4), prompts_per_step=4, seed=0, rank=r, world_size=3) for r in range(3)]
    assert [len(stream.next_batch()) for stream in three] == [2, 1, 1]


def test_stream_state_round_trip_replays_exactly():
    records = numbered(9)
    stream = PromptStream(records, prompts_per_step=4, seed=2, rank=1, world_size=2)
    for _ in range(3):
        stream.next_batch()
    state = stream.state_dict()
    expected = [ids(stream.next_batch()) for _ in range(2)]

    resumed = PromptStream(records, prompts_per_step=4, seed=2, rank=1, world_size=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # a checkpoint stores it as JSON
    assert [ids(resumed.next_batch()) for _ in range(2)] == expected
    assert resumed.steps_taken == 5
    assert (state["epoch"], state["offset"]) == (1, 3)  # 12 prompts taken of 9 per epoch


def test_stream_state_resumes_on_another_world_size():
    records = numbered(6)
    two = [PromptStream(records, prompts_per_step=4, seed=8, rank=r, world_size=2) for r in range(2)]
    for stream in two:
        stream.next_batch()
    one = PromptStream(records, prompts_per_step=4, seed=8)
    one.load_state_dict(two[0].state_dict())
    assert ids(one.next_batch()) == sum((ids(stream.next_batch()) for stream in two), [])


def test_stream_refuses_a_state_from_other_prompts_or_seed():
    state = PromptStream(numbered(4), prompts_per_step=2, seed=1).state_dict()
    message = "cannot resume the prompt stream: seed was 1 in the checkpoint but is 2 now"
    with pytest.raises(ValueError, match=message):
        PromptStream(numbered(4), prompts_per_step=2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_records was 4 in the checkpoint but is 5 now"):
        PromptStream(numbered(5), prompts_per_step=2, seed=1).load_state_dict(state)
    renamed = [PromptRecord(f"q{i}", "x") for i in range(4)]
    with pytest.raises(ValueError, match="records_fingerprint was"):
        PromptStream(renamed, prompts_per_step=2, seed=1).load_state_dict(state)


def test_stream_with_epochs_stops_after_the_last_full_step():
    stream = PromptStream(numbered(5), prompts_per_step=3, seed=0, shuffle=False, epochs=2)
    assert stream.steps_available() == 3  # 10 prompts -> 3 full steps, 1 prompt left over
    batches = [ids(stream.next_batch()) for _ in range(3)]
    assert batches == [["p0", "p1", "p2"], ["p3", "p4", "p0"], ["p1", "p2", "p3"]]
    with pytest.raises(StopIteration):
        stream.next_batch()
    assert list(PromptStream(numbered(5), prompts_per_step=3, seed=0, shuffle=False, epochs=2)) == [
        [numbered(5)[i] for i in batch] for batch in ([0, 1, 2], [3, 4, 0], [1, 2, 3])
    ]
    assert PromptStream(numbered(5), prompts_per_step=3, seed=0).steps_available() is None


def test_stream_with_fewer_prompts_than_a_batch_repeats_from_the_next_epochs():
    stream = PromptStream(numbered(2), prompts_per_step=5, seed=0, shuffle=False)
    assert ids(stream.next_batch()) == ["p0", "p1", "p0", "p1", "p0"]
    assert (stream.epoch, stream.offset) == (2, 1)
    shuffled = ids(PromptStream(numbered(2), prompts_per_step=6, seed=0).next_batch())
    assert [sorted(shuffled[i : i + 2]) for i in (0, 2, 4)] == [["p0", "p1"]] * 3  # each epoch whole


@pytest.mark.parametrize(
    ("records", "kwargs", "message"),
    [
        ([], {}, "PromptStream needs at least one prompt, got none"),
        (numbered(4), {"world_size": 2, "rank": 2}, r"rank must lie in \[0, world_size\)"),
        (numbered(4), {"epochs": 0}, "epochs must be >= 1 or None"),
    ],
)
def test_stream_rejects_bad_settings(records, kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptStream(records, prompts_per_step=4, seed=0, **kwargs)


def test_load_records_checks_each_knob_as_the_recipe_does():
    # before: the knobs reached read() unchecked: a float count was a TypeError from inside the
    # generator, a negative max_value a ValueError there (a plugin's read got whatever was passed)
    for options, message in [
        ({"num_problems": 2.5}, "data source 'arithmetic': num_problems: Input should be a valid integer, got a number "
                                "with a fractional part"),
        ({"num_problems": 3, "max_value": -5}, "data source 'arithmetic': max_value: Input should be greater than or "
                                               "equal to 0"),
    ]:
        with pytest.raises(DataError) as err:
            load_records("arithmetic", **options)
        assert str(err.value) == message
    with pytest.raises(DataError, match="data source 'file': path: Field required"):
        load_records("file")
