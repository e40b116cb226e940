"""The output folder of a command that writes one (`urlvr probe --out`, `urlvr mcs --out`).

A folder holds one run's results: a second run into it would leave the first run's files (a PNG
of a model the new run did not probe, the run directory of a model it did not rank) beside the new
ones, and nothing would tell them apart. So, as `urlvr train` refuses a folder that holds a run,
these commands refuse a folder holding files they own, unless `--overwrite`, which deletes exactly
those files (never anything else in the folder) before the new run writes its first file.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from urlvr.errors import RecipeError

__all__ = ["check_output_dir", "clear_owned"]


def check_output_dir(out_dir: Path, owned: Sequence[Path], *, overwrite: bool, command: str) -> list[Path]:
    """The files and folders of `owned` (what an earlier run of `command` may have left in
    `out_dir`) that exist. Any present without `overwrite`: RecipeError naming them. Call it before
    anything slow loads; delete the returned paths (`clear_owned`) before the first new write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RecipeError(f"{out_dir}: is a file, not a folder: --out names the folder `urlvr {command}` writes into")
    found = [path for path in dict.fromkeys(owned) if path.exists() or path.is_symlink()]
    if found and not overwrite:
        shown = ", ".join(path.name for path in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise RecipeError(f"{out_dir}: holds the output of an earlier `urlvr {command}` ({shown}); pass --overwrite "
                          "to replace it, or --out a new folder")
    return found


def clear_owned(paths: Sequence[Path]) -> None:
    """Delete `paths` (folders whole, a link itself, never its target)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
