"""Answer extractors: response text -> a normalised answer string, or None when there is none.

Model text is hostile input: a response may hold a 10^5-digit integer, a megabyte of braces or a
box that was cut off. Everything here therefore runs in time linear in the text (no `int()` of
unbounded digit strings -- CPython refuses more than 4300 digits -- no regex that can backtrack
catastrophically, no recursion) and returns an answer or None; `make_extractor` adds a last
guard so that even a plugin extractor that raises yields None instead of stopping the run.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from urlvr.registry import Registry, did_you_mean
from urlvr.rollout.base import Sample

Extractor = Callable[..., "str | None"]  # extractor(text, **recipe kwargs) -> answer or None


def _check_extractor_kwargs(fn: Extractor, name: str, kwargs: Mapping[str, Any]) -> None:
    """Every kwarg is a parameter of the extractor (past the text), and its ``check`` attribute,
    if any, accepts them (the regex extractor compiles its pattern there)."""
    accepted = [n for n, p in list(inspect.signature(fn).parameters.items())[1:]]
    unknown = [key for key in kwargs if key not in accepted]
    if unknown:
        raise ValueError(f"extractor {name!r} takes no argument {unknown[0]!r} (it takes: {', '.join(accepted) or 'none'})"
                         f"{did_you_mean(unknown[0], accepted)}")
    for key, value in kwargs.items():  # each value as its annotation says, strictly: `normalize: "false"` is not True
        _check_knob_type(fn, name, key, value)
    if hasattr(fn, "check"):
        fn.check(**kwargs)


def _check_knob_type(fn: Extractor, name: str, key: str, value: Any) -> None:
    """ValueError naming the knob when `value` does not fit the annotation of `fn`'s parameter `key`
    in pydantic's strict mode (no "yes" for a bool, no "3" for an int); an unannotated parameter,
    or one whose annotation does not resolve, takes anything."""
    try:
        annotation = inspect.signature(fn, eval_str=True).parameters[key].annotation
        adapter = TypeAdapter(annotation)
    except Exception:  # unresolvable or not a type pydantic checks: the extractor's own business
        return
    if annotation is inspect.Parameter.empty:
        return
    try:
        adapter.validate_python(value, strict=True)
    except ValidationError as err:
        raise ValueError(f"extractor {name!r}: argument {key!r}={value!r} is invalid ({err.errors()[0]['msg']})") from None


EXTRACTORS: Registry[Extractor] = Registry("extractor", check_kwargs=_check_extractor_kwargs)
_log = logging.getLogger(__name__)


def sample_answer(sample: Sample, extract: Callable[[str], str | None], *, from_truncated: bool = True) -> str | None:
    """`extract(sample.text)`, or None for a sample cut at the token cap (finish reason `length`)
    unless `from_truncated` (`reward.answer_from_truncated`: one rule for rewards, votes, metrics,
    evaluation and greedy probes)."""
    if sample.finish_reason == "length" and not from_truncated:
        return None
    return extract(sample.text)


def make_extractor(name: str, kwargs: Mapping[str, Any] | None = None) -> Callable[[str], str | None]:
    """The registered extractor ``name`` with the recipe's kwargs bound; bad kwargs fail here.

    An extractor may validate its kwargs eagerly: if it has a ``check`` attribute, it is called
    with the kwargs (the regex extractor compiles its pattern there). The returned callable never
    raises on model text: an exception inside the extractor (a plugin's bug, say) is logged once
    and the text counts as having no answer, so one odd response cannot stop a run.
    """
    kwargs = dict(kwargs or {})
    EXTRACTORS.check_kwargs(name, kwargs)
    fn = EXTRACTORS.get(name)
    return _Guarded(name, functools.partial(fn, **kwargs) if kwargs else fn)


class _Guarded:
    """An extractor that answers None instead of raising (the first failure is logged)."""

    def __init__(self, name: str, fn: Callable[[str], str | None]) -> None:
        self.name, self.fn, self.failures = name, fn, 0

    def __call__(self, text: str) -> str | None:
        try:
            return self.fn(text)
        except Exception as err:  # noqa: BLE001 -- model text must never stop the run
            self.failures += 1
            if self.failures == 1:
                _log.warning("extractor %r raised %s: %s on a response of %d characters; such responses "
                             "count as having no answer", self.name, type(err).__name__, err, len(text))
            return None


# --------------------------------------------------------------------------- normalisation
# Digit-group separators, between groups of exactly three digits: a comma, LaTeX's `{,}` (a comma
# without math spacing), LaTeX thin and ordinary spaces, and the Unicode thin / narrow no-break /
# no-break spaces. Longest first, so `\thinspace` is not read as `\t`+...
GROUP_SEPARATORS = ("\\thinspace", "{,}", "\\,", "\\ ", ",", "~", "\u2009", "\u202f", "\u00a0")
_SEP = "|".join(re.escape(s) for s in GROUP_SEPARATORS)
# A whole answer that is one grouped number (`8,000`, `-1\,234\,567.5`, `10 000`). Plain spaces
# count here, where the number is the whole answer, but not in free text (`last_number`). The
# same separator throughout (backreference), so `1,000 000` is not a number.
_GROUPED_NUMBER = re.compile(rf"([-+]?\d{{1,3}})({_SEP}| )(\d{{3}}(?:\2\d{{3}})*)(\.\d+)?")
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|textrm|textnormal|mathrm|mathbf|mbox)\s*\{")
_INTEGER = re.compile(r"([-+]?)(\d+)(?:\.0*)?")


def normalize_answer(answer: str) -> str:
    """Light, predictable normalisation so that `71`, ` 71 `, `71.`, `71.0`, `+071` and `71,000`/`71000`
    vote together.

    Deliberately shallow: symbolic equivalence (`1/2` vs `0.5`) is math-verify's job. Thousands
    separators are removed only from an answer that is one grouped number with groups of exactly
    three digits after the first (`8,000` = `8000`), so tuples stay tuples (`1,2` != `12`); for the
    same reason a space between two digits is kept (`1 2` != `12`), every other space is dropped.
    Linear time on any input; integers of any length are canonicalised as strings, never `int()`.
    """
    text = answer.strip().strip("$").strip()
    text = _unwrap_text(text)
    grouped = _GROUPED_NUMBER.fullmatch(text)
    if grouped:
        sign_and_head, separator, tail, decimals = grouped.groups()
        text = sign_and_head + tail.replace(separator, "") + (decimals or "")
    text = re.sub(r" +", functools.partial(_space, text), text).rstrip(".")
    integer = _INTEGER.fullmatch(text)  # `-05`, `71.`, `71.000` (the dot already stripped, or zeros only)
    if integer:
        digits = integer.group(2).lstrip("0") or "0"
        text = ("-" if integer.group(1) == "-" and digits != "0" else "") + digits
    return text


def _space(text: str, run: re.Match) -> str:
    """A run of spaces: kept as one space between two digits (`1 2` is not `12`), else dropped."""
    start, end = run.span()
    return " " if 0 < start and end < len(text) and text[start - 1] in _DIGITS and text[end] in _DIGITS else ""


_DIGITS = frozenset("0123456789")


def _unwrap_text(text: str) -> str:
    """`\\text{yes}` -> `yes` (also \\textbf, \\mathrm, \\mbox, ...), when the wrapper spans the whole
    answer (`\\text{A} or \\text{B}` stays). At most two layers: each costs one scan of the text."""
    for _ in range(2):
        wrapper = _TEXT_WRAPPERS.match(text)
        if not wrapper or not text.endswith("}") or _closing_brace(text, wrapper.end() - 1) != len(text) - 1:
            break
        text = text[wrapper.end() : -1].strip()
    return text


_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.S)  # an escaped character (`\{`, `\\`) or a brace


def _closing_brace(text: str, open_index: int) -> int | None:
    """Index of the `}` that closes the `{` at ``open_index`` (escaped braces skipped), or None."""
    depth = 0
    for token in _BRACE_TOKENS.finditer(text, open_index):
        char = token.group()
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return token.start()
    return None


# --------------------------------------------------------------------------- boxed answers
# `\boxed` and `\fbox` render the same box; `(?![A-Za-z])` ends the control word (`\boxedx` is another).
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_SPACE_FORM = re.compile(r"[^\s$]+")  # `\boxed 42$`: the argument runs to the next space or `$`


def last_boxed_span(text: str) -> tuple[int, int] | None:
    """Characters [start, end) of the content of the last boxed answer, or None.

    Accepts the spellings LaTeX renders as the same box and the MATH reference extractor
    (Hendrycks et al.'s `last_boxed_only_string`) reads: `\\boxed{...}`, `\\boxed {...}`,
    `\\fbox{...}` with nested (and escaped) braces balanced, and the space form `\\boxed 42`,
    whose argument runs to the next space or `$`. A box whose braces never close (the response
    was cut inside it) gives None. One pass over the text.
    """
    last = None
    for last in _BOX.finditer(text):
        pass
    if last is None:
        return None
    after = last.end()
    at = after
    while at < len(text) and text[at].isspace():
        at += 1
    if at < len(text) and text[at] == "{":
        close = _closing_brace(text, at)
        return None if close is None else (at + 1, close)
    if at == after:  # `\boxed42` or `\boxed}`: not an argument we can read
        return None
    argument = _SPACE_FORM.match(text, at)
    return argument.span() if argument else None


def last_boxed_content(text: str) -> str | None:
    """Content of the last boxed answer (see `last_boxed_span`), or None."""
    span = last_boxed_span(text)
    return None if span is None else text[span[0] : span[1]]


@EXTRACTORS.register("boxed")
def extract_boxed(text: str) -> str | None:
    """The last `\\boxed{...}` (or `\\boxed {}`, `\\fbox{}`, `\\boxed 42`) answer, normalised; None when absent or empty."""
    content = last_boxed_content(text)
    if content is None:
        return None
    answer = normalize_answer(content)
    return answer or None


# --------------------------------------------------------------------------- numbers in free text
# The last number of free text. A grouped number (`8,000`, `1\,234`) needs groups of exactly three
# digits and must not start inside a digit run or right after a separator (each group's start
# would otherwise retry the whole chain: quadratic on `1,000,000,...`); plain spaces do not
# group here (`in 3 000 ways` is ambiguous in prose).
_NOT_AFTER_SEPARATOR = "".join(f"(?<!{re.escape(s)})" for s in GROUP_SEPARATORS)
_NUMBER = re.compile(
    rf"[-+]?(?:(?<!\d){_NOT_AFTER_SEPARATOR}\d{{1,3}}({_SEP})\d{{3}}(?:\1\d{{3}})*(?!\d|(?:{_SEP})\d)|\d+)(?:\.\d+)?"
)


@EXTRACTORS.register("last_number")
def extract_last_number(text: str) -> str | None:
    """The last integer or decimal number in the text (digit groups `8,000` read as one number), normalised."""
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return normalize_answer(last.group()) if last else None


# --------------------------------------------------------------------------- tags and patterns
@EXTRACTORS.register("countdown_answer")
def extract_countdown_answer(text: str) -> str | None:
    """The last `<answer>...</answer>` content (TinyZero's Countdown format), normalised; None when absent."""
    found = _last_answer_tag(text)
    if found is None:
        return None
    answer = normalize_answer(text[found[0] : found[1]])
    return answer or None


def _last_answer_tag(text: str) -> tuple[int, int] | None:
    """Content span of the last closed `<answer>` tag. String searches, not a lazy regex: a lazy
    `<answer>(.*?)</answer>` rescans to the end from every unclosed `<answer>` (quadratic)."""
    close = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, close) if close >= 0 else -1
    if start < 0:
        return None
    start += len("<answer>")
    return start, text.find("</answer>", start)  # the tag's own closing tag (found: `close` is one)


@EXTRACTORS.register("regex")
def extract_regex(
    text: str, *, pattern: str, group: int | str = 1, occurrence: Literal["first", "last"] = "last",
    normalize: bool = True,
) -> str | None:
    """Capture `group` of the first or last match of `pattern` (Python `re`, DOTALL); None when none matches.

    The pattern is the recipe's: Python's `re` has no time limit, so a pattern with nested
    quantifiers (`(a+)+$`) can backtrack exponentially on model text -- keep patterns anchored
    on literal text (`Answer:\\s*(\\S+)`).
    """
    compiled = _compiled(pattern)
    if occurrence == "first":
        match = compiled.search(text)
    else:
        match = None
        for match in compiled.finditer(text):
            pass
    value = match.group(group) if match else None
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

    Tries, in order, the last boxed answer's content and the last `<answer>` tag content (used
    when they normalise to ``answer``), then the last literal occurrence of ``answer``. Used to
    find the answer's tokens (RLSF's probability disparity is measured on them).
    """
    box = last_boxed_span(text)
    if box is not None and normalize_answer(text[box[0] : box[1]]) == answer:
        return _trimmed(text, *box)
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
