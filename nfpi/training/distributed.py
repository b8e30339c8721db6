"""The few torch.distributed operations the loop needs, each a no-op on a single process.

Ray Train (or ``torchrun``) initialises the process group; the library only asks who it is,
sums tensors across ranks, broadcasts small objects from rank 0, and wraps the flow in DDP once.
"""

from __future__ import annotations

import time
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nfpi.device import resolve_device  # re-exported: the device choice is nfpi.device's

__all__ = [
    "CommTimer",
    "all_reduce_",
    "all_reduce_max_",
    "barrier",
    "broadcast_object",
    "resolve_device",
    "world",
    "wrap_ddp",
]

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_(t: Tensor) -> Tensor:
    """Sum ``t`` over all ranks in place (returns it)."""
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def all_reduce_max_(t: Tensor) -> Tensor:
    """Element-wise maximum of ``t`` over all ranks in place (returns it)."""
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj: T | None) -> T:
    """Rank 0's ``obj`` on every rank (others pass ``None``)."""
    if world()[1] > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    assert obj is not None, "rank 0 must pass the object to broadcast"
    return obj


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


class CommTimer:
    """Seconds from the launch of each DDP gradient all-reduce to its completion, summed: the
    communication plus the wait for the slowest rank (what a rank loses per step to the
    data-parallel sync). Read and reset it per epoch."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def reset(self) -> tuple[float, int]:
        out = (self.seconds, self.calls)
        self.seconds, self.calls = 0.0, 0
        return out


def _timed_allreduce(timer, bucket):
    """DDP's default hook (divide by the world size, all-reduce) with its duration recorded in
    ``timer`` (a :class:`CommTimer`); ``bucket`` is a ``dist.GradBucket``. The gradients are the
    same as without a hook."""
    t0 = time.perf_counter()
    tensor = bucket.buffer()
    tensor.div_(dist.get_world_size())

    def done(fut: torch.futures.Future) -> Tensor:
        timer.seconds += time.perf_counter() - t0
        timer.calls += 1
        return fut.value()[0]

    return dist.all_reduce(tensor, async_op=True).get_future().then(done)


def wrap_ddp(model: nn.Module, device: torch.device, timer: CommTimer | None = None) -> nn.Module:
    """``model`` in DistributedDataParallel when several ranks train it, else itself.

    Gradients are all-reduced in buckets straight from their ``.grad`` views
    (``gradient_as_bucket_view``: no copy into and out of the buckets); ``timer`` records the
    all-reduce time per step."""
    if world()[1] == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    if timer is not None:
        ddp.register_comm_hook(timer, _timed_allreduce)
    return ddp
