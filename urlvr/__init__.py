"""urlvr: GRPO for unsupervised RL with verifiable rewards.

    import urlvr
    recipe = urlvr.load_recipe("recipes/quickstart.yaml")
    result = urlvr.train(recipe)       # -> RunResult(run_dir, metrics, final_model_dir)
"""

import urlvr.builtins  # noqa: F401  (every built-in part registered before any recipe is validated)
from urlvr.recipe import Recipe, RecipeError, load_recipe
from urlvr.trainer.run import RunResult, Trainer, train

__all__ = ["Recipe", "RecipeError", "Trainer", "load_recipe", "train"]
__version__ = "0.1.0"
