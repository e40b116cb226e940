"""Atomic, resumable checkpoints.

Layout: `<run>/checkpoints/step-000004/` holding DeepSpeed's engine state (weights, optimizer,
LR scheduler), `trainer_state.json` (step, data position) and one `rng-rank<r>.pt` per rank.
Atomicity: every rank writes into `.tmp-step-000004/`; after a barrier rank 0 writes
`COMPLETE` and renames the folder in one `os.rename`. A kill at any moment leaves either the
old checkpoints untouched or the new one complete; half-written `.tmp-*` folders are ignored
and swept at the next save. Older complete checkpoints beyond `keep_last` are deleted only
after the new one is in place.
Frozen parameters (a LoRA run's base model) are left out: the run reloads them from
`model.path`, so a checkpoint holds the adapters, their optimizer state and the schedule.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from urlvr.dist import barrier

COMPLETE_MARKER = "COMPLETE"
DEEPSPEED_TAG = "deepspeed"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f"step-{step:06d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, engine, trainer_state: dict[str, Any], *, rank: int,
                    keep_last: int, keep_steps: Collection[int] = ()) -> Path:
    """Write checkpoint `step` atomically on every rank; returns its final path. Older ones beyond
    `keep_last` are pruned, except those of `keep_steps` (the best checkpoint)."""
    root = checkpoint_root(run_dir)
    final = checkpoint_dir(run_dir, step)
    tmp = root / f".tmp-step-{step:06d}"
    if rank == 0:
        for stale in root.glob(".tmp-step-*") if root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG,  # collective: every rank writes its shards
                           exclude_frozen_parameters=_has_frozen_parameters(engine))
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    if rank == 0:
        _write_json(tmp / "trainer_state.json", trainer_state)
    barrier()
    if rank == 0:
        (tmp / COMPLETE_MARKER).write_text(f"step {step}\n")
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        kept = {checkpoint_dir(run_dir, s) for s in keep_steps}
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            if old not in kept:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, engine, *, rank: int) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; return trainer state."""
    load_path, _ = engine.load_checkpoint(  # not strict when the frozen weights were left out of it
        str(path), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=True,
        load_module_strict=not _has_frozen_parameters(engine),
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the engine state from {path}")
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


def _has_frozen_parameters(engine) -> bool:
    return any(not p.requires_grad for p in engine.module.parameters())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
