"""Process-group setup that works the same under `python`, `deepspeed`, `torchrun` and
`accelerate launch`, on CPU (gloo) and GPU (nccl).

Why the environment defaults: a single process started without a launcher has no RANK /
WORLD_SIZE / MASTER_ADDR, and DeepSpeed then falls back to MPI discovery, which fails without
mpi4py. DS_ACCELERATOR must be set before deepspeed is first imported.

Why CPU worlds start without DeepSpeed's shared-memory op (``deepspeed_shm_comm``): it serves
only ``inference_all_reduce`` (DeepSpeed-Inference's tensor parallelism), which urlvr never
calls; ZeRO training reduces through torch.distributed (gloo on CPU). Built, it costs a C++ JIT
compile of minutes on a small machine the first time in each torch-extensions directory, and a
compatibility probe of every op on every later start. Worse, under the deepspeed launcher (which
sets LOCAL_SIZE) each rank creates a 69 MB ``/dev/shm/deepspeed_allreduce_buffer_*`` segment that
DeepSpeed never unlinks: RAM held until reboot, 138 MB per two-rank run (16 GB on one test
machine after a day of runs).

Why a launched rank watches its launchers: torchrun starts each rank in a session of its own and
never ties it to its own life, so `kill -9` of torchrun (or an OOM kill of it) left the ranks
training on as orphans, holding their memory and the run folder's lock, until the run ended; the
`deepspeed` command passes no SIGTERM on to its per-node process on one node, so a SIGTERM (or
kill -9) of it left that process and its ranks the same way. Only those launchers are followed
(`_launchers_to_watch`): under any other start a parent may exit on purpose.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from urlvr.lifeline import ancestors, wait_until_gone

_watching_launchers = False  # init_distributed starts the launcher watch once per process


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on the loopback now (the OS picks it; another process may take it before use)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> DistInfo:
    """Initialise (once) the default process group through DeepSpeed and describe this rank."""
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    global _watching_launchers
    if not _watching_launchers and (depth := _launchers_to_watch()):
        threading.Thread(target=_exit_with_launcher, args=(ancestors(depth),), daemon=True).start()
        _watching_launchers = True
    if "RANK" not in os.environ:  # no launcher: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed  # heavy (about a second), loaded on demand: only a run or probe starts distributed

    if not torch.distributed.is_initialized():
        # DeepSpeed prints a build notice for its CPU shared-memory op even with verbose=False:
        # keep it off the console, and show it only if initialisation fails
        notice = io.StringIO()
        try:
            with _no_shm_comm_op() if not use_cuda else contextlib.nullcontext(), contextlib.redirect_stdout(notice):
                deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)
        except BaseException:
            sys.stdout.write(notice.getvalue())
            raise
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def close_distributed() -> None:
    """Destroy the default process group, if any, at the successful end of a process that ran one
    (`urlvr.cli.run`; the last call of the process: DeepSpeed cannot start again after it). Left to interpreter exit, gloo's worker threads are torn down with the C++
    statics and can abort the process after the run finished ("terminate called without an active
    exception", exit -6, which the deepspeed launcher reports as a failed run; pytorch/pytorch
    #190489). Not after an error: a rank that failed while its peers wait in a collective would
    hang in a collective teardown (torchtitan calls it on success only, for the same reason)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _launchers_to_watch() -> int:
    """How many processes above this rank to follow (0: none). Only the launchers known to leave
    ranks behind, told by the variables they set: torchrun and `accelerate launch` (torch elastic's
    agent, the parent) and the deepspeed launcher (its per-node process, the parent; on one node
    also the `deepspeed` command above it, which passes no SIGTERM on). Under any other start (a
    user's RANK, srun, mpirun) a parent's exit may be deliberate, as in `nohup ... &`."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return 1
    if "CROSS_RANK" in os.environ:  # set only by deepspeed.launcher.launch
        return 2 if os.environ.get("CROSS_SIZE") == "1" else 1
    return 0


def _exit_with_launcher(launchers: list[int | None]) -> None:
    """End this rank within a second of the death of a process that launched it (`launchers`:
    its parent -- torchrun's agent, the deepspeed launcher's per-node process -- and, under the
    deepspeed launcher, the `deepspeed` command above that): with it gone, nothing else would
    stop a rank that trains on. The last complete checkpoint stays valid (written atomically)."""
    if not launchers[0] or launchers[0] <= 1:  # started by init, or the launcher was already gone
        return
    gone = wait_until_gone(launchers)
    print(f"urlvr: rank {os.environ.get('RANK', '?')}: its launcher (pid {gone}) is gone; stopping "
          "(the last complete checkpoint is intact: --resume the run folder)", file=sys.stderr, flush=True)
    os._exit(1)


@contextlib.contextmanager
def _no_shm_comm_op() -> Iterator[None]:
    """DeepSpeed's torch backend starts without its shared-memory all-reduce op (see the module
    docstring); ``deepspeed.initialize`` later reuses that backend, so the op is never built."""
    # not `import deepspeed.comm.torch as ...`: the package re-exports the name `torch` (torch itself)
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    build = getattr(ds_torch, "build_shm_op", None)
    if build is None:  # another DeepSpeed layout: leave it alone
        yield
        return
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = build


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def _world_of_many() -> bool:
    return torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def _to_comm_device(values: torch.Tensor) -> torch.Tensor:
    """A private copy on a device the backend accepts: NCCL takes CUDA tensors only."""
    if torch.distributed.get_backend() == "nccl":
        return values.to(torch.device("cuda", torch.cuda.current_device()), copy=True)
    return values.clone()


def _all_reduce(values: torch.Tensor, op: torch.distributed.ReduceOp) -> torch.Tensor:
    if _world_of_many():
        out = _to_comm_device(values)
        torch.distributed.all_reduce(out, op=op)
        values = out.to(values.device)
    return values


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (returned unchanged in a world of one)."""
    return _all_reduce(values, torch.distributed.ReduceOp.SUM)


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks."""
    return _all_reduce(values, torch.distributed.ReduceOp.MAX)


def all_gather_rows(values: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0, in rank order. The first dims may differ
    (ranks hold unequal shares of a batch); the other dims must match."""
    if _world_of_many():
        local = _to_comm_device(values)
        world = torch.distributed.get_world_size()
        counts = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(world)]
        torch.distributed.all_gather(counts, torch.tensor([local.shape[0]], device=local.device))
        longest = max(int(c) for c in counts)
        padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local
        pieces = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(pieces, padded)
        values = torch.cat([piece[: int(n)] for piece, n in zip(pieces, counts)]).to(values.device)
    return values


def all_gather_objects(items: list) -> list:
    """Every rank's list of picklable items, concatenated in rank order (the list itself in a
    world of one)."""
    if not _world_of_many():
        return items
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, items)
    return [item for part in everyone for item in part]


def even_shard(total: int, world_size: int, rank: int) -> range:
    """Rank `rank`'s contiguous share of `total` items split as evenly as they go: the first
    `total % world_size` ranks take one more (30 over 8 ranks: 4,4,4,4,4,4,3,3)."""
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))
