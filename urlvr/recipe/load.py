"""Reading a recipe: YAML file (or dict) + `--set a.b=c` overrides + plugins -> validated Recipe.

Every failure becomes one `RecipeError` whose message names the source file and the dotted
field path, one readable line per problem, so the CLI can print it without a traceback.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from urlvr.registry import Registry, did_you_mean
from urlvr.errors import RecipeError
from urlvr.recipe.sections import Recipe
from urlvr.recipe.sections.monitoring import tracker_spelling
from urlvr.recipe.variants import VariantOf, variant_container, variant_marker

__all__ = ["RecipeError", "load_recipe", "read_recipe_source", "format_validation_error", "current_spelling"]


def load_recipe(
    source: str | Path | Mapping[str, Any] | Recipe, overrides: Sequence[str] = (), *, origin: str | None = None
) -> Recipe:
    """Build a validated Recipe from a YAML path, a dict, or a Recipe (returned as is). `origin`
    names a dict's source in error messages (default `<dict>`)."""
    if isinstance(source, Recipe) and not overrides:
        return source
    found, data = read_recipe_source(source)
    origin = origin or found
    for override in overrides:
        _apply_override(data, override, origin)
    _import_plugins(data.get("plugins", []), origin)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_credit_overrides(format_validation_error(err, origin, data), origin, overrides, data)) from None


def current_spelling(data: dict[str, Any]) -> dict[str, Any]:
    """A recorded recipe (plain data, e.g. a run folder's `recipe.yaml` of an older urlvr) in today's
    spelling, so that comparing it with today's resolved recipe names real changes only:
    `logging.wandb` / `logging.tensorboard` become `logging.trackers`. Left as it is where the old
    section does not validate (the comparison then shows it)."""
    logging = data.get("logging")
    if not isinstance(logging, dict):
        return data
    try:
        return {**data, "logging": tracker_spelling(logging)}
    except ValidationError:
        return data


def _credit_overrides(message: str, origin: str, overrides: Sequence[str], data: Any = None) -> str:
    """Append `(from --set ...)` to each line about a field an override set (or a field inside a
    section it replaced): the mistake is then on the command line, not in the file the line names."""
    keys = [(override.partition("=")[0].strip(), override) for override in overrides]
    lines = []
    for line in message.splitlines():
        path = _as_written(line.removeprefix(f"{origin}: ").split(": ", 1)[0], data)
        setters = [o for key, o in keys if path == key or path.startswith(key + ".")]
        lines.append(line + (f" (from --set {setters[-1]})" if setters else ""))
    return "\n".join(lines)


def _as_written(path: str, data: Any) -> str:
    """An error path as the recipe writes it: `data.source.file.path` -> `data.source.path` (an
    error path names a data source's `kind`, which is a value in the recipe, not a section)."""
    node, kept = data, []
    for part in path.split("."):
        if isinstance(node, dict) and part not in node and node.get("kind") == part:
            continue
        kept.append(part)
        node = _item(node, part)
    return ".".join(kept)


def read_recipe_source(source: str | Path | Mapping[str, Any] | Recipe) -> tuple[str, dict[str, Any]]:
    """(origin for messages, the recipe as plain data); a missing file, bad YAML or a non-mapping
    is a one-line RecipeError naming the file."""
    if isinstance(source, Recipe):
        return "<recipe>", source.model_dump(mode="json")
    if isinstance(source, Mapping):
        return "<dict>", _deep_copy(source)
    path = Path(source)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    return str(path), read_yaml_mapping(path, "recipe")


_YAML_KINDS = {str: "a string", int: "a number", float: "a number", bool: "a boolean", list: "a list"}


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping with a repeated key: plain YAML keeps the last
    value, so a recipe with `lr` written twice would silently drop one of them."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key]}); YAML would keep "
                    "only the last value", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """The YAML mapping in `path` (an existing file). Bad YAML, an empty file, or a document that
    is a scalar or a list is a one-line RecipeError naming the file: an empty recipe is a mistake
    (a wrong path, a truncated copy), not a request for an all-defaults run -- that is `{}`."""
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{where} not valid YAML: {getattr(err, 'problem', err)}") from None
    if data is None:
        raise RecipeError(f"{path}: empty {what} file (a {what} is a mapping; write {{}} for all defaults)")
    if not isinstance(data, dict):
        kind = _YAML_KINDS.get(type(data), type(data).__name__)
        raise RecipeError(f"{path}: a {what} must be a mapping of sections, got {kind}")
    return data


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _apply_override(data: dict[str, Any], override: str, origin: str) -> None:
    """`section.field=value`; the value is parsed as YAML (numbers, bools, lists, null). A part
    that is a whole number indexes a list the recipe writes (`reward.terms.0.weight=0.5`); an index
    outside the list is a one-line error naming its length."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"{origin}: --set {override!r}: expected section.field=value")
    if not raw.strip():  # YAML reads nothing as null: a missing value must not reset a field silently
        raise RecipeError(f"{origin}: --set {override!r}: no value after '=' (write {key.strip()}=null for null)")
    parts = key.strip().split(".")
    node: dict[str, Any] | list[Any] = data
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[:depth + 1])
        if isinstance(node, list):
            index = _list_index(node, part, where, override, origin)
            child = node[index]
            if isinstance(child, str):  # a list item given by name only (`- majority_vote`): now with knobs
                child = node[index] = {"name": child}
        else:
            if part not in node and _is_index(parts[depth + 1]):  # a list the file does not write
                raise RecipeError(f"{origin}: --set {override!r}: {where} is not written in the recipe, so it has "
                                  f"no items to index; set the whole list ({where}=[...]) instead")
            child = node.setdefault(part, {})
            if isinstance(child, str):  # a variant chosen by name only (`loss: ppo_clip`): now with knobs
                child = node[part] = {_variant_key(parts[:depth + 1], data): child}
        if not isinstance(child, (dict, list)):
            raise RecipeError(f"{origin}: --set {override!r}: {part!r} is not a section")
        node = child
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(node, list):
        node[_list_index(node, parts[-1], key.strip(), override, origin)] = value
    else:
        node[parts[-1]] = value


def _variant_key(loc: list[str], data: dict[str, Any]) -> str:
    """The key that names the variant of the field at `loc` (`kind` for a data source), else `name`."""
    model = _model_at(Recipe, loc[:-1], data)
    marker = variant_marker(model.model_fields.get(loc[-1])) if model is not None else None
    return marker.key if marker is not None else "name"


def _is_index(part: str) -> bool:
    """A dotted part that reads as a list index (`0`, `12`, or a mistaken `-1`)."""
    return part.lstrip("-").isdigit()


def _list_index(items: list[Any], part: str, where: str, override: str, origin: str) -> int:
    """`part` as an index into `items` (the list at dotted path `where`): a whole number below
    the list's length; negative or past the end is a one-line RecipeError naming the length."""
    parent = where.rpartition(".")[0] or where
    if not _is_index(part):
        raise RecipeError(f"{origin}: --set {override!r}: {parent} is a list; address an item by its index "
                          f"(0..{len(items) - 1}), not {part!r}" if items else
                          f"{origin}: --set {override!r}: {parent} is an empty list; set it whole ({parent}=[...])")
    index = int(part)
    if not 0 <= index < len(items):
        span = f"indices 0..{len(items) - 1}" if items else "no indices"
        raise RecipeError(f"{origin}: --set {override!r}: index {index} outside {parent}, a list of {len(items)} "
                          f"item{'s' if len(items) != 1 else ''} ({span})")
    return index


def _import_plugins(plugins: Any, origin: str) -> None:
    if not isinstance(plugins, list):
        return  # pydantic reports the type error with its field path
    for index, module in enumerate(plugins):
        if not isinstance(module, str):
            continue
        before = Registry.registrations
        try:
            importlib.import_module(module)
        except Exception as err:  # the plugin's own error, shown in one line
            raise RecipeError(
                f"{origin}: plugins.{index}: cannot import {module!r}: {type(err).__name__}: {err}"
                + (f" (is the folder holding {module.split('.')[0]!r} on PYTHONPATH? e.g. PYTHONPATH=. urlvr ...)"
                   if isinstance(err, ModuleNotFoundError) and err.name == module.split(".")[0] else "")
            ) from None
        registered = Registry.registrations > before or any(  # imported before: did it register then?
            name == module or name.startswith(module + ".") for name in Registry.registering_modules)
        if not registered:  # e.g. a typo that names some installed module
            raise RecipeError(
                f"{origin}: plugins.{index}: importing {module!r} registered nothing (a plugin module registers "
                "rewards, losses, statistics, engines, ... with their decorators, e.g. @reward(\"name\"))")


def format_validation_error(err: ValidationError, origin: str, data: Any = None) -> str:
    """One line per field with a problem: `file: dotted.path: message` (a union's members'
    complaints joined by "; or "). `data`, the validated input, tells which variant a section
    path went through (for the known fields of an unknown key)."""
    found: dict[str, list[str]] = {}  # field path -> its problems (several: one per member of a union)
    for problem in err.errors():
        loc = [str(part) for part in problem["loc"]]
        tag = next((i for i, part in enumerate(loc) if _UNION_MEMBER.match(part)), None)
        path = ".".join(loc if tag is None else loc[:tag]) or "<root>"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = _unknown_field_message(loc, data)
        elif "input" in problem and problem["type"] not in ("missing", "value_error", "assertion_error",
                                                             "variant_unknown", "variant_missing"):
            message += f" (got {problem['input']!r})"
        if tag is not None and loc[tag + 1:]:
            message = f"item {'.'.join(loc[tag + 1:])}: {message}"
        found.setdefault(path, []).append(message)
    return "\n".join(f"{origin}: {path}: {'; or '.join(messages)}" for path, messages in found.items())


# a union member's tag in an error location (`list[str]`, `literal['all-linear']`, `int`): the
# members' problems are one problem of the field, one line
_UNION_MEMBER = re.compile(r"^[a-z-]+\[.*\]$|^(int|float|str|bool|none)$")


def _unknown_field_message(loc: list[str], data: Any) -> str:
    model = _model_at(Recipe, loc[:-1], data)
    known = sorted(model.model_fields) if model else []
    return f"unknown field {loc[-1]!r}{did_you_mean(loc[-1], known)} (known: {', '.join(known)})"


def _model_at(model: type[BaseModel], loc: list[str], data: Any = None) -> type[BaseModel] | None:
    """Walk section classes along a pydantic error location (list indices, union tags and
    variants chosen by `name` in `data` included)."""
    candidates = [model]
    items_of: VariantOf | None = None  # the variant marker of a list or map of variants, awaiting its item
    for part in loc:
        if items_of is not None:
            data = _item(data, part)
            chosen = items_of.choices().get(items_of.chosen_name(data))
            candidates, items_of = [chosen] if chosen else [], None
            if not candidates:
                return None
            continue
        fields = [m.model_fields[part] for m in candidates if part in m.model_fields]
        data = data.get(part) if isinstance(data, dict) else None
        old = [m.old_spellings[part] for m in candidates if part in getattr(m, "old_spellings", {})]
        if not fields and old:  # a section's old spelling, still read (`logging.wandb`)
            candidates = old
            continue
        marker = variant_marker(fields[0]) if fields else None
        if marker is not None and variant_container(fields[0].annotation) is not None:
            items_of = marker
        elif marker is not None:
            chosen = marker.choices().get(marker.chosen_name(data))
            candidates = [chosen] if chosen else []
        elif fields:
            candidates = _models_in(fields[0].annotation)
        else:  # a list index, or the discriminator tag of a union variant
            tagged = [m for m in candidates if _tag(m) == part]
            candidates = tagged or candidates
        if not candidates:
            return None
    return candidates[0]


def _item(data: Any, part: str) -> Any:
    """The item `part` (a map key or a list index) of `data`, else None."""
    if isinstance(data, dict):
        return data.get(part)
    if isinstance(data, list) and part.isdigit() and int(part) < len(data):
        return data[int(part)]
    return None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        found += _models_in(arg)
    return found


def _tag(model: type[BaseModel]) -> str | None:
    kind = model.model_fields.get("kind")
    return kind.default if kind is not None else None
