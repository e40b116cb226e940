"""Where training and evaluation prompts come from, and how they are templated (`data`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from urlvr.recipe.variants import VariantOf
from urlvr.section import RegisteredSection, Section


# A data source is a registered part with its own section (`urlvr.data.loaders`; plugins add more),
# picked by `kind` as every recipe writes it: `source: {kind: arithmetic, num_problems: 64}`.
DataSource = Annotated[RegisteredSection, VariantOf("data_source", default=None, key="kind", name_in_path=True)]


class DataSection(Section):
    source: DataSource = "arithmetic"
    """Where prompts come from: a registered data source, `kind` picks it and the rest are its knobs
    (file | datasets | adapter | arithmetic | countdown | reasoning_gym | a plugin's)."""
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
