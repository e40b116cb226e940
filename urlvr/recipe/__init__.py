"""The recipe package: sections (the schema) and loading (YAML, overrides, plugins, errors)."""

from urlvr.recipe.load import RecipeError, load_recipe
from urlvr.recipe.sections import Recipe

__all__ = ["Recipe", "RecipeError", "load_recipe"]
