"""`urlvr list [KIND]`: every registered part, by kind, one line each (name + summary).

Read from the registry catalog (`urlvr.registry.catalog`), so a new kind of part, or a plugin's
parts (imported before), show up with no change here.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from urlvr.registry import Registry, catalog, did_you_mean


def summary(entry: Any) -> str:
    """One line about a registered entry: its `description` (rewards, detectors), else the first
    line of its own docstring (functions, sections, engine classes); "" when it has neither (an
    instance's docstring is its class's, the same for every entry, so it is not used). A docstring
    gives its first sentence, which may wrap over lines."""
    described = getattr(entry, "description", None)
    if isinstance(described, str) and described.strip():
        return described.strip().splitlines()[0]
    if not (inspect.isclass(entry) or inspect.isroutine(entry)):
        return ""
    doc = inspect.getdoc(entry) if inspect.isroutine(entry) else entry.__dict__.get("__doc__")
    if not doc or not doc.strip():
        return ""
    paragraph = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    return re.split(r"(?<=\.)\s+(?=[A-Z`])", paragraph)[0]  # its first sentence ("et al. 2024" is not an end)


def kinds_matching(query: str) -> list[str]:
    """The catalog keys a user's word names: the key itself (`policy_loss`, `policy-loss`), or a
    word of a kind, singular or plural (`rewards`, `losses` -> policy_loss and loss_aggregation,
    `engines`, `filters` -> group_filter and token_filter). Unknown: a ValueError in one line
    listing the kinds."""
    found = catalog()
    key = query.strip().lower().replace("-", "_").replace(" ", "_")
    singular = {key, key.removesuffix("s"), key.removesuffix("es")}
    if key in found:
        return [key]
    matches = sorted(k for k, reg in found.items() if singular & {*reg.kind.split(), k, k.replace("_", "")})
    if matches:
        return matches
    words = sorted({*found, *(w + "s" for reg in found.values() for w in reg.kind.split())})
    raise ValueError(f"no registry of {query!r}{did_you_mean(key, words)} (kinds: {', '.join(sorted(found))})")


def entry_lines(found: Registry[Any]) -> list[str]:
    """`  name  summary` for each entry of one registry, names aligned."""
    width = max((len(name) for name in found.names()), default=0)
    return [f"  {name:{width}s}  {summary(found.get(name))}".rstrip() for name in found.names()]


def listing(query: str | None = None) -> str:
    """What `urlvr list [KIND]` prints: per kind (all of them, or those `query` names), a header
    `key (N):` and one line per entry."""
    found = catalog()
    keys = sorted(found) if query is None else kinds_matching(query)
    blocks = []
    for key in keys:
        reg = found[key]
        blocks.append("\n".join([f"{key} ({len(reg.names())}):", *entry_lines(reg)]))
    return "\n\n".join(blocks)


def registered_elsewhere(name: str, but: str) -> str:
    """Where else `name` is registered when registry `but` lacks it (`urlvr rewards restrain`:
    "it is an advantage_shaper (urlvr list advantage_shaper)"), or "" when nowhere."""
    keys = [key for key, reg in sorted(catalog().items()) if key != but and name in reg.names()]
    return "; ".join(f"it is an entry of {key} (urlvr list {key})" for key in keys)
