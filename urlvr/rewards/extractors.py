"""Answer extractors: response text -> a normalised answer string, or None when there is none."""

from __future__ import annotations

import re
from collections.abc import Callable

from urlvr.registry import Registry

Extractor = Callable[[str], "str | None"]
EXTRACTORS: Registry[Extractor] = Registry("extractor")


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
