"""One generic name -> object registry, shared by rewards, advantage estimators, losses,
rollout engines and loggers.

Why one class: every swappable part of urlvr is chosen by name in a recipe, and every such
name must fail the same way when mistyped -- at recipe load time, listing the known names and
suggesting the closest -- instead of at step 300.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


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

    def __init__(self, kind: str, *, check: Callable[[T, str], None] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._check = check  # registration-time check of an entry (e.g. a variant section's own name)

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
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (known: {', '.join(known) or 'none'})"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
