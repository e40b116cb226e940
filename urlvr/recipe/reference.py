"""Generate the recipe reference (docs/recipe.md) from the pydantic schema, so docs never drift.

    python -m urlvr.recipe.reference > docs/recipe.md
"""

from __future__ import annotations

import json
import re
from typing import get_args, get_origin

from pydantic import BaseModel

from urlvr.recipe.sections import Recipe
from urlvr.recipe.knobs import knobs_marker
from urlvr.recipe.names import registered_marker
from urlvr.section import RegisteredSection
from urlvr.recipe.variants import variant_container, variant_marker


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("pathlib.", "")
    text = re.sub(r"Annotated\[(\w+), <[^>]*>\]", r"\1", text)  # Registered markers: the table says it
    if isinstance(annotation, type):
        text = annotation.__name__
    return text.replace("|", "\\|")


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "(section)" if isinstance(value, BaseModel) else f"`{json.dumps(_jsonable(value))}`"
    if field.is_required():
        return "required"
    return f"`{json.dumps(_jsonable(field.default))}`"


def _jsonable(value):
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, tuple):
        return list(value)
    return value if isinstance(value, (int, float, str, bool, dict, type(None))) else str(value)


def _cell(text: str | None) -> str:
    return (text or "").replace("\n", " ").replace("|", "\\|")


def _models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models(arg)]


def section_table(model: type[BaseModel], prefix: str, out: list[str], seen: set, title: str | None = None) -> None:
    rows, nested, knob_tables = [], [], []
    for name, field in model.model_fields.items():
        knobs = knobs_marker(field)
        if knobs is not None:  # a term's kwargs: the knobs of the part it names, one table per part
            # urlvr's own parts only, as for variants
            choices = {n: sub for n, sub in knobs.choices().items() if sub.__module__.startswith("urlvr.")}
            knob_tables.append((f"{prefix}{name}", choices))
            rows.append(f"| `{name}` | the knobs of the {knobs.kind.replace('_', ' ')} `name` names (below) "
                        f"| {_default(field)} | {_cell(field.description)} |")
            continue
        marker = variant_marker(field)
        if marker is not None:  # a registered part with its own section: one table per variant
            # urlvr's own variants only: a plugin imported in this process (a test, a docs example)
            # is no part of urlvr's reference
            choices = {n: sub for n, sub in marker.choices().items() if sub.__module__.startswith("urlvr.")}
            nested += [(f"{prefix}{name}", sub) for sub in choices.values()]
            one = f"a name or `{{{marker.key}: ..., ...}}`"
            many = {list: f"a list, each {one}", dict: f"a map of names, each {one}"}
            rows.append(f"| `{name}` | {many.get(variant_container(field.annotation), one)}, one of: "
                        f"{', '.join(f'`{n}`' for n in choices)} | {_default(field)} | {_cell(field.description)} |")
            continue
        subs = _models(field.annotation)
        if subs:
            nested += [(f"{prefix}{name}", sub) for sub in subs]
            if len(subs) > 1:
                kind = "map of name to one of" if get_origin(field.annotation) is dict else "one of"
                rows.append(f"| `{name}` | {kind}: {', '.join(s.__name__ for s in subs)} | {_default(field)} | {_cell(field.description)} |")
            continue
        picks = issubclass(model, RegisteredSection) and name == model.variant_key
        meaning = field.description or ("Selects this variant." if picks else "")
        registered = registered_marker(field)
        if registered is not None:  # the registry's names as they are now (plugins imported ones included)
            meaning += f" Registered: {', '.join(f'`{n}`' for n in registered.names())}."
        rows.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {_cell(meaning)} |")
    if rows:
        if title is None:
            title = f"`{prefix.rstrip('.')}` ({model.__name__})" if prefix else "Top level"
        if issubclass(model, RegisteredSection):
            key = model.variant_key
            title = f"`{prefix.rstrip('.')}` with `{key}: {model.model_fields[key].default}` ({model.__name__})"
        out += [f"## {title}", "", "| field | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    for path, choices in knob_tables:
        bare = [f"`{n}`" for n, sub in choices.items() if not sub.model_fields]
        if bare:
            out += [f"`{path}` is empty (`{{}}`) for {', '.join(bare)}: they take no knobs.", ""]
        for part, sub in choices.items():
            section_table(sub, path + ".", out, seen, title=f"`{path}` with `name: {part}` ({sub.__name__})")
    for path, sub in nested:
        key = (path, sub)
        if key not in seen:
            seen.add(key)
            section_table(sub, path + ".", out, seen)


def render() -> str:
    """The reference of every section; each registered variant gets its table (`urlvr/__init__.py`
    registers the built-ins, a plugin imported before adds its own)."""
    out = ["# Recipe reference", "",
           "Generated from the pydantic schema by `python -m urlvr.recipe.reference`; do not edit by hand.",
           "Every section refuses unknown keys. `urlvr schema` prints the same as JSON schema.", "",
           "On the command line, `--set section.field=value` overrides a field (the value is read as YAML);",
           "a whole-number part picks an item of a list the recipe writes, from 0: `--set reward.terms.0.weight=0.5`.",
           ""]
    section_table(Recipe, "", out, set())
    return "\n".join(line for line in out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
