"""Answer extractors: response text -> a normalised answer string, or None when there is none."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

from urlvr.registry import Registry

Extractor = Callable[..., "str | None"]  # extractor(text, **recipe kwargs) -> answer or None
EXTRACTORS: Registry[Extractor] = Registry("extractor")


def make_extractor(name: str, kwargs: Mapping[str, Any] | None = None) -> Callable[[str], str | None]:
    """The registered extractor ``name`` with the recipe's kwargs bound; bad kwargs fail here.

    An extractor may validate its kwargs eagerly: if it has a ``check`` attribute, it is called
    with the kwargs (the regex extractor compiles its pattern there).
    """
    fn = EXTRACTORS.get(name)
    kwargs = dict(kwargs or {})
    accepted = [n for n, p in list(inspect.signature(fn).parameters.items())[1:]]
    unknown = [key for key in kwargs if key not in accepted]
    if unknown:
        raise ValueError(f"extractor {name!r} takes no argument {unknown[0]!r} (it takes: {', '.join(accepted) or 'none'})")
    if hasattr(fn, "check"):
        fn.check(**kwargs)
    return functools.partial(fn, **kwargs) if kwargs else fn


def normalize_answer(answer: str) -> str:
    """Light, predictable normalisation so that `71`, ` 71 `, `71.` and `71.0` vote together.

    Deliberately shallow: symbolic equivalence (`1/2` vs `0.5`) is math-verify's job.
    """
    text = answer.strip().strip("$").strip()
    text = re.sub(r"^\\text\{(.*)\}$", r"\1", text)
    text = text.replace(" ", "").rstrip(".")
    if re.fullmatch(r"[-+]?\d+\.0*", text):
        text = text.split(".")[0]
    if re.fullmatch(r"[-+]?\d+", text):
        text = str(int(text))
    return text


def last_boxed_content(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (nested braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the response was cut inside the box


@EXTRACTORS.register("boxed")
def extract_boxed(text: str) -> str | None:
    """The last `\\boxed{...}` answer, normalised; None when absent or empty."""
    content = last_boxed_content(text)
    if content is None:
        return None
    answer = normalize_answer(content)
    return answer or None


@EXTRACTORS.register("last_number")
def extract_last_number(text: str) -> str | None:
    """The last integer or decimal number in the text, normalised."""
    numbers = re.findall(r"[-+]?\d+(?:\.\d+)?", text)
    return normalize_answer(numbers[-1]) if numbers else None


@EXTRACTORS.register("countdown_answer")
def extract_countdown_answer(text: str) -> str | None:
    """The last `<answer>...</answer>` content (TinyZero's Countdown format), normalised; None when absent."""
    found = _last_answer_tag(text)
    if found is None:
        return None
    answer = normalize_answer(text[found[0] : found[1]])
    return answer or None


def _last_answer_tag(text: str) -> tuple[int, int] | None:
    matches = list(re.finditer(r"<answer>(.*?)</answer>", text, re.S))
    return matches[-1].span(1) if matches else None


@EXTRACTORS.register("regex")
def extract_regex(
    text: str, *, pattern: str, group: int | str = 1, occurrence: Literal["first", "last"] = "last",
    normalize: bool = True,
) -> str | None:
    """Capture `group` of the first or last match of `pattern` (Python `re`, DOTALL); None when none matches."""
    matches = list(re.finditer(_compiled(pattern), text))
    if not matches:
        return None
    value = matches[-1 if occurrence == "last" else 0].group(group)
    if value is None:
        return None
    answer = normalize_answer(value) if normalize else value.strip()
    return answer or None


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.S)


def _check_regex(*, pattern: str | None = None, group: int | str = 1, occurrence: str = "last", normalize: bool = True) -> None:
    if pattern is None:
        raise ValueError("extractor 'regex' needs a `pattern` (reward.extractor_kwargs.pattern)")
    try:
        compiled = _compiled(pattern)
    except re.error as err:
        raise ValueError(f"extractor 'regex': pattern {pattern!r} does not compile: {err}") from None
    if isinstance(group, int) and group > compiled.groups:
        raise ValueError(f"extractor 'regex': pattern {pattern!r} has {compiled.groups} groups, asked for group {group}")
    if isinstance(group, str) and group not in compiled.groupindex:
        raise ValueError(f"extractor 'regex': pattern {pattern!r} has no group named {group!r}")
    if occurrence not in ("first", "last"):
        raise ValueError(f"extractor 'regex': occurrence must be 'first' or 'last', got {occurrence!r}")


extract_regex.check = _check_regex  # type: ignore[attr-defined]


def answer_char_span(text: str, answer: str) -> tuple[int, int] | None:
    """Characters [start, end) of ``text`` that hold the extracted ``answer``, or None.

    Tries, in order, the last `\\boxed{}` content and the last `<answer>` tag content (used when
    they normalise to ``answer``), then the last literal occurrence of ``answer``. Used to find
    the answer's tokens (RLSF's probability disparity is measured on them).
    """
    start = text.rfind("\\boxed{")
    content = last_boxed_content(text)
    if start >= 0 and content is not None and normalize_answer(content) == answer:
        begin = start + len("\\boxed{")
        return _trimmed(text, begin, begin + len(content))
    tag = _last_answer_tag(text)
    if tag is not None and normalize_answer(text[tag[0] : tag[1]]) == answer:
        return _trimmed(text, *tag)
    found = text.rfind(answer)
    return (found, found + len(answer)) if found >= 0 and answer else None


def _trimmed(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None
