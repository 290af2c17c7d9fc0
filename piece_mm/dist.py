"""Data parallelism for processes started by `accelerate launch` (on CPU: `--multi_gpu --num_processes 2`, which
runs gloo; accelerate's `--cpu --num_processes 2` starts a single process unless MPI is used).

Every process holds the whole model and takes its share of each global batch. Gradients, or for the sparse optimizer
only its compact gradients, and the importance sums are summed across processes, so every process takes the same
step and chooses the same mask. Without a process group, every helper is the single-process identity."""
from __future__ import annotations

import torch
import torch.distributed as dist


def init():
    """Join the process group that `accelerate launch` describes in the environment (no-op for one process); returns
    accelerate's PartialState (process index, count, device)."""
    from accelerate import PartialState
    return PartialState()


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def sum_(tensors) -> None:
    """Sum the tensors across processes, in place, through one flat buffer (one collective, not one per tensor)."""
    tensors = [t for t in tensors if t is not None]
    if world() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def share(items: list) -> list:
    """This process's share of a global batch (or of a list of scoring batches): every world()-th item."""
    return items[rank()::world()]
