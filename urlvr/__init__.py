"""urlvr: GRPO for unsupervised RL with verifiable rewards.

    import urlvr
    recipe = urlvr.load_recipe("recipes/quickstart.yaml")
    result = urlvr.train(recipe)       # -> RunResult(run_dir, metrics, final_model_dir)
"""

from urlvr.recipe import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "Trainer", "load_recipe", "train"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # the trainer pulls in torch/deepspeed/transformers: import it only when asked for
    if name in ("train", "Trainer", "RunResult"):
        from urlvr.trainer import run

        return getattr(run, name)
    raise AttributeError(name)
