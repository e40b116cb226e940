"""One generic name -> object registry, shared by rewards, advantage estimators, losses,
rollout engines and loggers.

Why one class: every swappable part of urlvr is chosen by name in a recipe, and every such
name must fail the same way when mistyped -- at recipe load time, listing the known names and
suggesting the closest -- instead of at step 300.

Why a catalog (`registry(kind)`): the recipe layer checks names against the registries of parts
that live above it (rewards, losses, engines). Each registry joins the catalog when the module
that owns it makes it, and `urlvr.builtins` (imported by `urlvr/__init__.py`) makes and fills every
built-in one, so validation looks a registry up here instead of importing the layers above it.
"""

from __future__ import annotations

import difflib
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the known name closest to a mistyped one, else "" (compared
    lower-cased, so `MAJORITY_VOTE` still finds `majority_vote`)."""
    lowered = {entry.lower(): entry for entry in known}
    close = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.5)
    return f"; did you mean {lowered[close[0]]!r}?" if close else ""


def repeated(names: Iterable[str]) -> list[str]:
    """The names that occur more than once in `names`, sorted (a recipe's terms, trackers, a
    command's models: each must be given once)."""
    return sorted(name for name, count in Counter(names).items() if count > 1)


class UnknownNameError(KeyError):
    """Raised for a name nobody registered; its message lists the known names."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


def _calling_module() -> str:
    """The first module outside urlvr on the call stack: the plugin whose decorator registers."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("urlvr."):
        frame = frame.f_back
    return frame.f_globals.get("__name__", "") if frame is not None else ""


class Registry(Generic[T]):
    """Maps names to objects, registered through a decorator; duplicate names are refused."""

    registrations = 0  # over every registry: tells whether importing a plugin module registered anything
    registering_modules: set[str] = set()  # the modules whose objects were registered (plugins checked against it)

    def __init__(
        self, kind: str, *, check: Callable[[T, str], None] | None = None,
        check_kwargs: Callable[[T, str, Mapping[str, Any]], None] | None = None,
    ) -> None:
        key = catalog_key(kind)
        if key in _CATALOG:
            raise ValueError(f"a registry of {kind}s exists already ({_CATALOG[key]!r}); there is one per kind")
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._check = check  # registration-time check of an entry (e.g. a variant section's own name)
        self._check_kwargs = check_kwargs  # load-time check of a recipe's kwargs for an entry
        _CATALOG[key] = self

    def __repr__(self) -> str:
        return f"Registry({self.kind!r})"

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REWARDS.register("majority_vote")`` above a function or class."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (by {self._entries[name]!r}); "
                    "pick another name"
                )
            if self._check is not None:
                self._check(obj, name)
            self._entries[name] = obj
            Registry.registrations += 1
            Registry.registering_modules.add(_calling_module())
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownNameError(self.unknown_name_message(name))
        return self._entries[name]

    def unknown_name_message(self, name: str) -> str:
        known = sorted(self._entries)
        return f"unknown {self.kind} {name!r}{did_you_mean(name, known)} (known: {', '.join(known) or 'none'})"

    def check_kwargs(self, name: str, kwargs: Mapping[str, Any]) -> None:
        """Load-time check that a recipe's `kwargs` fit the entry `name` (ValueError naming the
        problem); a registry made without `check_kwargs` accepts any."""
        entry = self.get(name)
        if self._check_kwargs is not None:
            self._check_kwargs(entry, name, kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


_CATALOG: dict[str, Registry[Any]] = {}  # catalog key ("policy_loss") -> the registry of that kind


def catalog_key(kind: str) -> str:
    """The key a recipe names a registry by: its kind with underscores (`policy loss` -> `policy_loss`)."""
    return kind.replace(" ", "_")


def registry(key: str) -> Registry[Any]:
    """The registry of `key` (`reward`, `policy_loss`, ...; see `catalog_key`). A key nobody made
    is a KeyError naming the known ones: the module owning it was not imported."""
    if key not in _CATALOG:
        raise KeyError(f"no registry {key!r} (known: {', '.join(sorted(_CATALOG)) or 'none'}): "
                       "import the module that makes it (urlvr.builtins makes every built-in one)")
    return _CATALOG[key]


def catalog() -> dict[str, Registry[Any]]:
    """Every registry made so far, by catalog key."""
    return dict(_CATALOG)
