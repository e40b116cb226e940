"""Process-group setup that works the same under `python`, `deepspeed`, `torchrun` and
`accelerate launch`, on CPU (gloo) and GPU (nccl).

Why the environment defaults: a single process started without a launcher has no RANK /
WORLD_SIZE / MASTER_ADDR, and DeepSpeed then falls back to MPI discovery, which fails without
mpi4py. DS_ACCELERATOR must be set before deepspeed is first imported.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> DistInfo:
    """Initialise (once) the default process group through DeepSpeed and describe this rank."""
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # no launcher: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    if not torch.distributed.is_initialized():
        # DeepSpeed prints a build notice for its CPU shared-memory op even with verbose=False:
        # keep it off the console, and show it only if initialisation fails
        notice = io.StringIO()
        try:
            with contextlib.redirect_stdout(notice):
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
    """Concatenate every rank's equal-shaped tensor along dim 0, in rank order."""
    if _world_of_many():
        local = _to_comm_device(values)
        pieces = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(pieces, local)
        values = torch.cat(pieces).to(values.device)
    return values
