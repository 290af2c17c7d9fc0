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


BUCKET = 1 << 26  # elements per collective (256 MB of fp32): one flat copy of a 7B model's sums would not fit


def sum_(tensors) -> None:
    """Sum the tensors across processes, in place, through flat buffers of up to BUCKET elements (few collectives,
    never a copy of everything at once). Tensors kept in host memory go through the GPU when the backend is NCCL."""
    tensors = [t for t in tensors if t is not None]
    if world() == 1 or not tensors:
        return
    via = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    bucket, size = [], 0
    for t in tensors + [None]:
        if bucket and (t is None or size + t.numel() > BUCKET):
            flat = torch.cat([b.reshape(-1).float().to(via or bucket[0].device) for b in bucket])
            dist.all_reduce(flat)
            for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(part.view_as(b))
            bucket, size = [], 0
        if t is not None:
            bucket.append(t)
            size += t.numel()


def share(items: list) -> list:
    """This process's share of a global batch (or of a list of scoring batches): every world()-th item."""
    return items[rank()::world()]


def _exact(t: torch.Tensor, op) -> torch.Tensor:
    """One collective on `t` in its own dtype (through the GPU under NCCL); returns its result."""
    via = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    return op(t.to(via)).to(t.device)


def sum_exact(t: torch.Tensor) -> None:
    """Sum `t` across processes in place, in its own dtype (int64 counts stay exact past 2**24)."""
    if world() > 1:
        def op(x):
            dist.all_reduce(x)
            return x
        t.copy_(_exact(t, op))


def gather_all(t: torch.Tensor) -> torch.Tensor:
    """[world, *t.shape]: every process's `t` (same shape on all), in rank order."""
    if world() == 1:
        return t.unsqueeze(0)

    def op(x):
        out = [torch.empty_like(x) for _ in range(world())]
        dist.all_gather(out, x)
        return torch.stack(out)
    return _exact(t, op)


def gather_objects(obj) -> list:
    """Every process's `obj` (picklable), in rank order."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out
