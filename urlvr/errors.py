"""Errors meant for the user as they are: the CLI prints their message in one line, no traceback.

A leaf module, so that any layer (a rollout engine refusing a setting, the recipe loader, the
trainer) can raise them without importing the layer that defines the recipe.
"""


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and field and is meant for the user as is."""
