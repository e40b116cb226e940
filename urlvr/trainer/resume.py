"""What a resume may change: the recipe a run directory recorded against the one given now.

`--resume RUN_DIR` runs the recipe on the command line, so a changed field (a `--set`, an edited
file) takes effect from the checkpoint's step on. Each changed field is printed (`old -> new`)
and the new resolved recipe is recorded beside the first one as `recipe.resume-<step>.yaml`, so
the folder says which recipe trained which steps. A field the checkpoint fixes is refused before
anything loads, with the reason: the restored state would override it (the change would not
act) or would no longer fit it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from urlvr.errors import RecipeError
from urlvr.recipe import Recipe
from urlvr.recipe.changes import FieldChange, recipe_changes
from urlvr.recipe.load import current_spelling, read_yaml_mapping

_OPTIMIZER_STATE = ("the checkpoint restores the optimizer's and the LR schedule's state, and with it the old "
                    "value: the new one would not act")

# field (and everything below it) -> why a resume cannot honour a change to it
FIXED_BY_CHECKPOINT: dict[str, str] = {
    "model.path": "the checkpoint holds the weights trained from the old model; the new one would never be loaded",
    "model.lora": "the checkpoint holds weights (or adapters) of the old shapes and targets",
    "seed": "the prompt order of the steps already trained follows the old seed: the stream would replay or "
            "skip prompts",
    "data.source": "the checkpoint's data position counts into the old prompt set",
    "data.shuffle": "the checkpoint's data position is in the old prompt order",
    "optim.lr": _OPTIMIZER_STATE,
    "optim.betas": _OPTIMIZER_STATE,
    "optim.adam_eps": _OPTIMIZER_STATE,
    "optim.weight_decay": _OPTIMIZER_STATE,
    "optim.weight_decay_exclude": "the checkpoint's optimizer state is laid out in the old parameter groups "
                                  "(one group, or decayed and not decayed)",
}

# a shaping's per-prompt state (trainer_state.json's `advantage_shaping`) is read by the shaping that
# resumes: another one (`none` aside, which keeps none) would read it as its own
_SHAPING = "algorithm.advantage_shaping.name"
_SHAPING_STATE = ("the checkpoint holds the old shaping's per-prompt state (trainer_state.json's advantage_shaping), "
                  "which the new one would read as its own")

_RESUME_FILE = re.compile(r"^recipe\.resume-(\d+)\.yaml$")


def recorded_recipe(run_dir: Path, step: int) -> tuple[Path, dict[str, Any]] | None:
    """(file, plain data in today's spelling) of the recipe in effect at checkpoint `step`: the latest
    `recipe.resume-<s>.yaml` with s <= step, else `recipe.yaml`; None for a folder without one."""
    resumed = sorted((int(m.group(1)), p) for p in run_dir.glob("recipe.resume-*.yaml")
                     if (m := _RESUME_FILE.match(p.name)) and int(m.group(1)) <= step)
    path = resumed[-1][1] if resumed else run_dir / "recipe.yaml"
    return (path, current_spelling(read_yaml_mapping(path, "recorded recipe"))) if path.is_file() else None


def resume_changes(run_dir: Path, recipe: Recipe, step: int) -> list[FieldChange]:
    """The fields `recipe` changes against the one recorded for checkpoint `step` (`output_dir`
    aside: the folder may have moved). A change to a field in FIXED_BY_CHECKPOINT raises
    RecipeError, one line per such field with its reason."""
    recorded = recorded_recipe(run_dir, step)
    if recorded is None:
        return []
    path, old = recorded
    changes = recipe_changes(old, recipe.model_dump(mode="json"))
    # a field the recorded recipe lacks was added to urlvr since: its default is what ran
    fixed = [(c, reason) for c in changes for key, reason in FIXED_BY_CHECKPOINT.items()
             if (c.path == key or c.path.startswith(key + ".")) and not c.added]
    fixed += [(c, _SHAPING_STATE) for c in changes if c.path == _SHAPING and not c.added and "none" not in (c.old, c.new)]
    if fixed:
        lines = "\n".join(f"  {change} ({reason})" for change, reason in fixed)
        raise RecipeError(f"{run_dir}: --resume cannot change what the step-{step} checkpoint fixes (recorded in "
                          f"{path.name}):\n{lines}\nundo these changes, or start a new run (another output_dir) "
                          "from the exported weights")
    return changes


def record_resume(run_dir: Path, recipe: Recipe, step: int) -> Path:
    """Write the resolved recipe that trains the steps after `step`: `recipe.resume-<step>.yaml`."""
    path = run_dir / f"recipe.resume-{step}.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    return path
