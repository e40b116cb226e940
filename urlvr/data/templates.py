"""Prompt templates: a PromptRecord -> the text the policy sees -> token ids.

Two kinds, and a template string picks one: ``"chat"`` uses the tokenizer's own chat template;
anything else is a plain Python format string with exactly one field, ``{prompt}``.
Prompts are never truncated: a truncated question is a different question, so a prompt over
``max_prompt_length`` tokens is an error, or, if the recipe asks, skipped and counted.

Special tokens follow the tokenizer's own convention, as vLLM and HF pipelines do: a chat
template writes its special tokens (BOS included) into the text, so chat text is tokenized
without adding any; plain text is tokenized as ``tokenizer(text)`` would, so a tokenizer that
prepends BOS (Llama-3, Gemma, Mistral base models) prepends it here too -- unless the plain
template already starts with the BOS text, which would otherwise give two.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from urlvr.data.records import DataError, PromptInput, PromptRecord

logger = logging.getLogger(__name__)

CHAT = "chat"


def check_template(template: str) -> str:
    """Return ``template`` if usable: ``"chat"`` or a format string whose only field is
    ``{prompt}`` (literal braces are written ``{{`` and ``}}``); else raise DataError."""
    if template == CHAT:
        return template
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:  # e.g. an unmatched "{"
        raise DataError(
            f"template {template!r} is not a valid format string ({err}); "
            "write literal braces as {{ and }}"
        ) from None
    others = sorted({name for name in fields if name != "prompt"})
    if others:
        shown = ", ".join("{" + name + "}" for name in others)
        raise DataError(
            f"template {template!r} has fields other than {{prompt}}: {shown} "
            "(write literal braces as {{ and }})"
        )
    if not fields:
        raise DataError(f"template {template!r} has no {{prompt}} field (or use 'chat')")
    return template


def render_prompt(
    tokenizer: Any,
    record: PromptRecord,
    *,
    template: str,
    system_prompt: str | None = None,
    suffix: str = "",
) -> str:
    """The text the policy sees for ``record``: its question plus ``suffix``, templated."""
    question = record.prompt + suffix
    if template == CHAT:
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(
                "template 'chat' needs a tokenizer with a chat template, and this one has none; "
                "use a plain template such as 'Question: {prompt}\\nAnswer:'"
            )
        messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
        messages.append({"role": "user", "content": question})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if system_prompt is not None:
        # A plain template has no place for a system message; dropping it silently would
        # train on prompts the recipe did not describe.
        raise DataError(
            "system_prompt needs the 'chat' template; put the text into the plain template instead"
        )
    return check_template(template).format(prompt=question)


def encode_prompt_text(tokenizer: Any, text: str, *, template: str) -> tuple[int, ...]:
    """Token ids of a prompt rendered with ``template``: BOS exactly once where the tokenizer uses
    one (see the module docstring). Every place that tokenizes prompt text goes through here."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special_tokens = template != CHAT and not (bos and text.startswith(bos))
    return tuple(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


@dataclass(frozen=True)
class EncodedPrompts:
    """Prompts that fit, in input order, with their records; and the ids of those skipped."""

    inputs: tuple[PromptInput, ...]
    records: tuple[PromptRecord, ...]  # records[i] is the record behind inputs[i]
    skipped_ids: tuple[str, ...] = ()

    @property
    def skipped(self) -> int:
        return len(self.skipped_ids)


def encode_prompts(
    tokenizer: Any,
    records: Sequence[PromptRecord],
    *,
    template: str,
    system_prompt: str | None = None,
    suffix: str = "",
    max_prompt_length: int,
    on_long_prompt: Literal["error", "skip"] = "error",
    context_length: int | None = None,
) -> EncodedPrompts:
    """Template and tokenize ``records`` (special tokens: ``encode_prompt_text``). A prompt over ``max_prompt_length`` tokens raises a
    DataError naming it, or with ``on_long_prompt="skip"`` is dropped and counted. So does one of
    ``context_length`` tokens or more (the model's, ``rollout.base.context_length``): it leaves no
    room for a response, which both rollout engines would refuse at its first step."""
    if on_long_prompt not in ("error", "skip"):
        raise ValueError(f"on_long_prompt must be 'error' or 'skip', got {on_long_prompt!r}")
    check_template(template)
    inputs: list[PromptInput] = []
    kept: list[PromptRecord] = []
    skipped: list[str] = []
    for record in records:
        text = render_prompt(tokenizer, record, template=template, system_prompt=system_prompt, suffix=suffix)
        token_ids = encode_prompt_text(tokenizer, text, template=template)
        fills_context = context_length is not None and len(token_ids) >= context_length
        if len(token_ids) > max_prompt_length or fills_context:
            if on_long_prompt == "error" and len(token_ids) > max_prompt_length:
                raise DataError(
                    f"prompt {record.prompt_id!r} is {len(token_ids)} tokens, over "
                    f"max_prompt_length={max_prompt_length} (raise it, or set "
                    "on_long_prompt: skip to drop such prompts)"
                )
            if on_long_prompt == "error":
                raise DataError(
                    f"prompt {record.prompt_id!r} is {len(token_ids)} tokens, which fill the model's context "
                    f"length of {context_length} (config.max_position_embeddings) and leave no room for a "
                    "response (set on_long_prompt: skip to drop such prompts)"
                )
            skipped.append(record.prompt_id)
            continue
        inputs.append(PromptInput(record.prompt_id, text, token_ids))
        kept.append(record)
    if skipped:
        logger.warning(
            "skipped %d of %d prompts longer than %d tokens (first: %s)",
            len(skipped), len(records),
            max_prompt_length if context_length is None else min(max_prompt_length, context_length - 1),
            ", ".join(skipped[:5]),
        )
    return EncodedPrompts(tuple(inputs), tuple(kept), tuple(skipped))
