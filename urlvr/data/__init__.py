"""Prompt data: loaders (file, datasets, the paper's datasets by name, synthetic) -> PromptRecords
-> templates -> PromptStream."""

from urlvr.data.adapters import DATASET_ADAPTERS, DatasetAdapter
from urlvr.data.loaders import (
    DATA_SOURCES,
    DataSourceSection,
    load_records,
    load_records_from_datasets,
    load_records_from_file,
)
from urlvr.data.records import DataError, PromptRecord
from urlvr.data.stream import PromptStream
from urlvr.data.templates import EncodedPrompts, check_template, encode_prompt_text, encode_prompts, render_prompt

__all__ = [
    "DATASET_ADAPTERS",
    "DATA_SOURCES",
    "DataSourceSection",
    "DataError",
    "DatasetAdapter",
    "EncodedPrompts",
    "PromptRecord",
    "PromptStream",
    "check_template",
    "encode_prompt_text",
    "encode_prompts",
    "load_records",
    "load_records_from_datasets",
    "load_records_from_file",
    "render_prompt",
]
