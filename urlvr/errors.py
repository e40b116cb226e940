"""Errors meant for the user as they are: the CLI prints their message in one line, no traceback.

A leaf module, so that any layer (a rollout engine refusing a setting, the recipe loader, the
trainer) can raise them without importing the layer that defines the recipe.
"""


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and field and is meant for the user as is."""


class KnobError(ValueError):
    """A recipe knob of a registered part (a reward's `kwargs`) that does not fit; `knob` names it,
    so the recipe points its one-line error at the field (`reward.terms.0.kwargs.majority_share`)."""

    def __init__(self, message: str, *, knob: str) -> None:
        super().__init__(message)
        self.knob = knob


class GenerationServerError(RuntimeError):
    """The generation server (`rollout.engine: server`) did not come up, died, hung past its
    timeout, or served a policy version the trainer did not expect; the message says which, with
    the timeout and the server's log file."""
