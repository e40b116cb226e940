"""Atomic, resumable checkpoints.

Layout: `<run>/checkpoints/step-000004/` holding DeepSpeed's engine state (weights, optimizer,
LR scheduler), `trainer_state.json` (step, data position) and one `rng-rank<r>.pt` per rank.
Atomicity: every rank writes into `.tmp-step-000004/`; after a barrier rank 0 writes
`COMPLETE` and renames the folder in one `os.rename`. A kill at any moment leaves either the
old checkpoints untouched or the new one complete; half-written `.tmp-*` folders are ignored
and swept at the next save. Older complete checkpoints beyond `keep_last` are deleted only
after the new one is in place.

Another number of ranks: the prompt stream's position and the per-prompt sampling seeds do not
depend on the world size, but ZeRO-1/2/3 split the optimizer state per rank. Resuming on another
world size therefore first converts the checkpoint once into DeepSpeed's universal format
(`universal/` next to `deepspeed/`, per-parameter fp32 weights and Adam moments), which any world
size loads. ZeRO-0 keeps the whole state on every rank and loads as it is. docs/multi-node.md.

Frozen parameters (a LoRA run's base model) are left out: the run reloads them from
`model.path`, so a checkpoint holds the adapters, their optimizer state and the schedule.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from urlvr.dist import all_gather_objects, barrier
from urlvr.errors import RecipeError

COMPLETE_MARKER = "COMPLETE"
IN_FLIGHT_FILE = "inflight.pt"  # the rollouts in flight at the save (trainer.max_staleness > 0)
DEEPSPEED_TAG = "deepspeed"
UNIVERSAL_TAG = "universal"  # the same state, resharded for any world size (DeepSpeed's universal checkpoint)
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


def checkpoint_step(path: Path) -> int:
    """The step of checkpoint folder `path` (`step-000012` -> 12)."""
    return int(_STEP_DIR.match(path.name).group(1))


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
                    keep_last: int, keep_steps: Collection[int] = (), rollouts: list[dict] | None = None) -> Path:
    """Write checkpoint `step` atomically on every rank; returns its final path. Older ones beyond
    `keep_last` are pruned, except those of `keep_steps` (the best checkpoint). `rollouts`: the
    rollouts in flight (trainer/producer.py), global, written by rank 0 to `inflight.pt`."""
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
        if rollouts:
            torch.save(rollouts, tmp / IN_FLIGHT_FILE)
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


def load_checkpoint(path: Path, engine, *, rank: int, universal: bool = False) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; return trainer state.
    `universal`: from the universal copy (`prepare_reshard`), for another world size."""
    engine._config.load_universal_checkpoint = universal  # DeepSpeed reads it at load time
    try:
        load_path, _ = engine.load_checkpoint(  # not strict when the frozen weights were left out of it
            str(path), tag=UNIVERSAL_TAG if universal else DEEPSPEED_TAG, load_optimizer_states=True,
            load_lr_scheduler_states=True, load_module_strict=not _has_frozen_parameters(engine))
    finally:
        engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the engine state from {path}")
    rng_file = path / f"rng-rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


def load_rollouts(path: Path) -> list[dict]:
    """The rollouts that were in flight when checkpoint `path` was written ([] when none were)."""
    stored = path / IN_FLIGHT_FILE
    return torch.load(stored, weights_only=False) if stored.is_file() else []


def agreed_latest_checkpoint(run_dir: Path) -> Path:
    """The latest complete checkpoint, which every rank must see: a node that cannot see the run
    directory (a node-local disk) fails here, on every rank, before anything loads."""
    latest = latest_checkpoint(run_dir)
    seen = all_gather_objects([None if latest is None else latest.name])
    if all(name is None for name in seen):
        raise RecipeError(f"{run_dir}: --resume given but the run has no complete checkpoint (it stopped before "
                          "its first one, trainer.save_every): delete the folder to start over")
    if len(set(seen)) > 1:
        views = ", ".join(f"rank {r}: {name or 'none'}" for r, name in enumerate(seen))
        raise RecipeError(
            f"{run_dir}: the ranks do not see the same latest complete checkpoint ({views}). Every rank loads "
            "it, so output_dir must be on a filesystem all nodes share")
    return latest


def saved_world_size(path: Path) -> int:
    """The number of ranks that wrote checkpoint `path` (one RNG file each)."""
    state = json.loads((path / "trainer_state.json").read_text())
    return state.get("world_size") or len(list(path.glob("rng-rank*.pt")))


def prepare_reshard(path: Path, *, world_size: int, zero_stage: int, is_main: bool) -> bool:
    """Whether checkpoint `path` must load through its universal copy (written here, once, by
    the main rank) because it was saved on another number of ranks."""
    saved = saved_world_size(path)
    if saved == world_size or zero_stage == 0:  # ZeRO-0: every rank holds the whole state
        return False
    if zero_stage == 3:
        raise RecipeError(
            f"{path} was saved on {saved} ranks under ZeRO-3 and this run has {world_size}: resuming ZeRO-3 on "
            f"another number of ranks is not supported yet. Resume on {saved} ranks, or start a new run from the "
            f"weights (`final/`, or `python {path / 'zero_to_fp32.py'} {path} OUT_DIR --tag {DEEPSPEED_TAG}`)")
    target = path / UNIVERSAL_TAG
    if is_main and not target.is_dir():
        tmp = path / f".{UNIVERSAL_TAG}-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(path / DEEPSPEED_TAG), "--output_folder", str(tmp), "--inject_missing_state"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(
                f"{path} was saved on {saved} ranks and this run has {world_size}; converting it to DeepSpeed's "
                f"universal checkpoint failed ({' '.join(command)}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}\n"
                f"Resume on {saved} ranks instead.")
        os.rename(tmp, target)
    barrier()
    return True


def check_shared_run_dir(run_dir: Path, *, is_main: bool) -> None:
    """Every rank must see the run directory the main rank writes (checkpoints are written by all
    ranks into one folder and loaded by all): a node whose `output_dir` is a node-local disk
    stops the run on every rank before step 1."""
    token = all_gather_objects([os.urandom(8).hex()])[0]  # rank 0's
    probe = Path(run_dir) / f".rank-check-{token}"
    if is_main:
        probe.write_text(token)
    barrier()
    seen = all_gather_objects([probe.is_file() and probe.read_text() == token])
    barrier()
    if is_main:
        probe.unlink()
    blind = [rank for rank, ok in enumerate(seen) if not ok]
    if blind:
        raise RecipeError(
            f"{run_dir}: ranks {blind} cannot see the files rank 0 writes there. output_dir must be on a "
            "filesystem every node shares (NFS, Lustre, ...): every rank writes its checkpoint shards into it "
            "and loads them from it on resume")


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


def lock_run_dir(run_dir: Path):
    """An exclusive lock on `run_dir` for this process's lifetime (returned: keep it referenced):
    a second run (or a resume) started into a folder a run is still writing is refused, instead of
    interleaving two runs' metrics and checkpoints, naming the pid that holds it (written into the
    lock file). The kernel drops the lock when the process ends, even on kill -9, so no stale
    lock survives a crash."""
    import fcntl  # POSIX only, loaded on demand: importing urlvr elsewhere must not fail for want of it

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    handle = open(Path(run_dir) / ".urlvr.lock", "a+")  # not "w": a refused opener must not erase the holder's pid
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        # the pid, because the holder may be no run the user knows of: ranks a killed torchrun left
        # behind keep training (and holding this lock) until they finish
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise RecipeError(f"{run_dir}: another urlvr process{who} is running in this folder; wait for it to finish "
                          "(then --resume it) or set output_dir to a new folder") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
