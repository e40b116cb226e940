"""Imports point down (docs/step.md, "Layers"): the recipe layer knows no part above it, and no
import of urlvr hides inside a function to dodge a cycle. Read from the source, not by importing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from urlvr.registry import Registry, registry

PACKAGE = Path(__file__).resolve().parent.parent / "urlvr"
# what the recipe layer (and the leaves it stands on) may import from urlvr
RECIPE_MAY_IMPORT = ("urlvr.recipe", "urlvr.registry", "urlvr.section", "urlvr.errors")


def _imports(path: Path) -> list[tuple[ast.stmt, str, bool]]:
    """(statement, imported module, inside a function body) for every import of `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_functions = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for node in ast.walk(fn) if node is not fn}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, alias.name, id(node) in in_functions) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node, node.module, id(node) in in_functions))
    return found


def _where(path: Path, node: ast.stmt) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"


def test_the_recipe_layer_imports_nothing_above_it():
    files = [*sorted((PACKAGE / "recipe").rglob("*.py")), PACKAGE / "section.py", PACKAGE / "registry.py"]
    upward = [f"{_where(path, node)} imports {module}" for path in files for node, module, _ in _imports(path)
              if module.startswith("urlvr") and not module.startswith(RECIPE_MAY_IMPORT)]
    assert upward == []


def test_no_import_of_urlvr_is_deferred_into_a_function():
    deferred = [f"{_where(path, node)} imports {module}" for path in sorted(PACKAGE.rglob("*.py"))
                for node, module, inside in _imports(path) if inside and module.split(".")[0] == "urlvr"]
    assert deferred == []


def test_every_import_deferred_into_a_function_says_why():
    """Only an optional or heavy package is loaded on demand, and its line says so."""
    silent = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        silent += [_where(path, node) for node, _, inside in _imports(path)
                   if inside and "#" not in lines[node.lineno - 1]]
    assert silent == []


def test_the_recipe_finds_every_registry_it_names_in_the_catalog():
    from urlvr.recipe.names import RECIPE_KINDS, registries

    assert sorted(registries()) == sorted(RECIPE_KINDS)
    assert "majority_vote" in registry("reward") and "ppo_clip" in registry("policy_loss")


def test_a_registry_kind_is_made_once_and_an_unknown_kind_names_the_known_ones():
    with pytest.raises(ValueError, match="a registry of rewards exists already"):
        Registry("reward")
    with pytest.raises(KeyError, match=r"no registry 'rewrad' \(known: .*reward"):
        registry("rewrad")
