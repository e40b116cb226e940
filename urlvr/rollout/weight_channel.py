"""Weights from the trainer to a generation server over a real collective (gloo on CPU).

The channel is a two-member process group, {trainer rank 0, the server}, built beside the
trainer's own (``torch.distributed.ProcessGroupGloo`` over a ``TCPStore`` the server hosts), so
it needs no change to the trainer's world and no second ``init_process_group``. A sync is one
broadcast per bucket from the trainer: the bucket's tensors packed into one flat buffer per
dtype, in the order of a layout both sides agreed on beforehand (names, shapes, dtypes; sent
over the request connection). Buckets are gathered under ZeRO-3 one at a time on every trainer
rank (``weight_sync.iter_weights``); only rank 0 broadcasts.

Why gloo and not NCCL here: this is the CPU path the tests run. On GPUs the same layout and
order would go over NCCL (a ``ProcessGroupNCCL`` on the same store); that path is not built
yet (docs/async.md says what is verified where).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as td

TRAINER, SERVER = 0, 1  # the two members of the channel


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


Layout = list[list[TensorSpec]]  # buckets of tensors, in the order they are broadcast


class WeightChannel:
    """One end of the trainer -> server weight channel.

    ``member`` is TRAINER or SERVER; ``session`` names this pair (a server outlives a trainer
    that is killed and resumed: each connection opens its own channel in the same store).
    ``timeout_s`` bounds every broadcast: a peer that died or hangs raises RuntimeError within
    it instead of blocking the run forever."""

    def __init__(self, store: td.Store, session: str, member: int, timeout_s: float) -> None:
        timeout = datetime.timedelta(seconds=timeout_s)
        self.group = td.ProcessGroupGloo(td.PrefixStore(f"urlvr-weights/{session}", store), member, 2, timeout)
        self.member = member
        self._in_flight: list[tuple[td.Work, torch.Tensor]] = []  # broadcasts sent, not yet confirmed

    def send(self, layout: Layout, tensors: Iterator[tuple[str, torch.Tensor]]) -> int:
        """Start broadcasting `tensors` (in `layout` order) bucket by bucket; returns the bytes.
        Returns once every bucket is packed and handed to gloo, which sends in the background
        while the server may still be generating: the trainer goes on training, and `finish`
        (called by the next `send`) waits for the server to have taken them. ValueError when a
        tensor does not match its place in the layout (a bug, never silent)."""
        self.finish()
        sent = 0
        for bucket in layout:
            received = []
            for spec in bucket:
                name, tensor = next(tensors)
                if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                    raise ValueError(f"weight sync: got {name} {tuple(tensor.shape)} {tensor.dtype}, the layout "
                                     f"says {spec.name} {spec.shape} {spec.dtype}")
                received.append(tensor)
            for flat in _flat_buffers(bucket, received):
                self._in_flight.append((self._start_broadcast(flat), flat))  # the buffer lives until confirmed
                sent += flat.numel() * flat.element_size()
        return sent

    def finish(self, timeout_s: float | None = None) -> None:
        """Wait until the server has received every broadcast started so far. RuntimeError
        (gloo's) when it did not within `timeout_s` (default: the channel's timeout), or went away."""
        in_flight, self._in_flight = self._in_flight, []
        bound = datetime.timedelta(0) if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        for work, _ in in_flight:
            work.wait(bound)

    def receive(self, layout: Layout) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(name, tensor)` in layout order as each bucket arrives (fresh CPU tensors)."""
        for bucket in layout:
            flats = [torch.empty(sum(_numel(s) for s in specs), dtype=dtype) for dtype, specs in _by_dtype(bucket)]
            for flat in flats:
                self._start_broadcast(flat).wait()
            views: dict[str, torch.Tensor] = {}
            for flat, (_, specs) in zip(flats, _by_dtype(bucket)):
                offset = 0
                for spec in specs:
                    views[spec.name] = flat[offset:offset + _numel(spec)].view(spec.shape)
                    offset += _numel(spec)
            yield from ((spec.name, views[spec.name]) for spec in bucket)

    def _start_broadcast(self, flat: torch.Tensor) -> td.Work:
        options = td.BroadcastOptions()
        options.rootRank = TRAINER
        return self.group.broadcast([flat], options)


def _numel(spec: TensorSpec) -> int:
    numel = 1
    for size in spec.shape:
        numel *= size
    return numel


def _by_dtype(bucket: list[TensorSpec]) -> list[tuple[torch.dtype, list[TensorSpec]]]:
    """The bucket's specs grouped by dtype, in first-seen order (one flat buffer each)."""
    groups: dict[torch.dtype, list[TensorSpec]] = {}
    for spec in bucket:
        groups.setdefault(spec.dtype, []).append(spec)
    return list(groups.items())


def _flat_buffers(bucket: list[TensorSpec], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    by_name = {spec.name: tensor for spec, tensor in zip(bucket, tensors)}
    return [torch.cat([by_name[s.name].detach().reshape(-1).cpu() for s in specs]) for _, specs in _by_dtype(bucket)]
