"""Sparse tuning on FSDP2 shards (`torch.distributed.fsdp.fully_shard`), for models that do not fit one device.

FSDP2 shards every parameter on dim 0 as a DTensor: rank r holds rows [r·c, (r+1)·c) of it, c = ceil(rows / N), so
its local shard is one contiguous run of the parameter's flat indices, starting at `offset(p)`. Everything sparse is
done on that run:
- scoring: each scoring batch is split over the ranks and FSDP2 reduce-scatters (sums) its gradient, so every rank
  adds the whole batch's gradient, restricted to its shard, into shard-sized sums (importance/piece.py);
- selection: an exact top-k over all shards without gathering any score tensor (select.py, `_top_k`);
- the optimizer: each rank keeps fp32 masters and Adam state only for the chosen elements inside its shard
  (sparse.py), so its memory is about 1/N of the unsharded one;
- checkpoints, deltas and the final model gather to the first process (functions below).

Masks are kept whole (global flat indices, the same on every rank, as saved), and each rank takes its own part of
them. Only the single-process code paths run without a process group: every helper here is then the identity."""
from __future__ import annotations

import contextlib
import os

import torch

from piece_mm import dist


def _dtensor():
    try:
        from torch.distributed.tensor import DTensor
        return DTensor
    except ImportError:  # torch built without distributed
        return ()


def is_sharded(t) -> bool:
    return isinstance(t, _dtensor())


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds (a view: writing it writes the shard); `t` itself when it is not sharded."""
    return t.to_local() if is_sharded(t) else t


def offset(p) -> int:
    """Flat index, in the whole parameter, of the first element of this rank's shard (0 when not sharded)."""
    if not is_sharded(p):
        return 0
    from torch.distributed.tensor import Shard
    (placement,) = p.placements
    if not isinstance(placement, Shard) or placement.dim != 0:
        raise TypeError(f"expected a parameter sharded on dim 0 (FSDP2), got placements {p.placements}")
    rows = p.shape[0]
    chunk = -(-rows // p.device_mesh.size())  # ceil: torch.chunk's split, FSDP2's
    row = min(p.device_mesh.get_local_rank() * chunk, rows)
    return row * (p.numel() // max(rows, 1))


def local_part(idx: torch.Tensor, p) -> torch.Tensor:
    """The flat indices of a whole-parameter mask that fall in this rank's shard, as indices into the shard."""
    if not is_sharded(p):
        return idx
    lo, n = offset(p), local(p).numel()
    idx = idx.to(torch.int64)
    return idx[(idx >= lo) & (idx < lo + n)] - lo


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def requested() -> str | None:
    """What `accelerate launch` asks for: "fsdp2", "fsdp1", "deepspeed" or None (data parallel or one process)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp2" if os.environ.get("FSDP_VERSION", "1") == "2" else "fsdp1"
    return None


def shard_model(model):
    """fully_shard every block transformers says must stay whole (`_no_split_modules`: the decoder layers, the
    vision encoder layers), then the root, over all processes. Gradients are summed, not averaged, across ranks: the
    loop divides each loss by the global batch's token count itself, as under data parallelism."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.world(),))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for m in list(model.modules()):
        if m is not model and type(m).__name__ in blocks:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in model.modules():  # each sharded block reduces its own gradients
        if isinstance(m, FSDPModule):
            _sum_across_ranks(m)
    # FSDP2 makes the first module that runs forward the root. Evaluation may first call a part (the vision
    # tower, from generate), so the root is initialised here, as its own first forward would do.
    model._get_fsdp_state()._lazy_init()
    return model


def _sum_across_ranks(unit) -> None:
    unit.set_gradient_divide_factor(1.0)
    unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum


@contextlib.contextmanager
def summed(model):
    """Sum the ranks' gradients (no averaging) on every FSDP2 unit for the duration, then restore what was set.
    Scoring divides each rank's loss by the global batch's answer-token count itself, so the reduce-scatter must
    add the shares: shard_model sets this for good, while a model sharded by transformers at load time
    (`from_pretrained(distributed_config=...)`) or by accelerate averages, as a Trainer expects."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # FSDPModule has setters but no getters: read what each unit's parameter groups hold now
    before = [[(g.gradient_divide_factor, g.force_sum_reduction_for_comms)
               for g in m._get_fsdp_state()._fsdp_param_groups] for m in units]
    for m in units:
        _sum_across_ranks(m)
    try:
        yield
    finally:
        for m, was in zip(units, before):
            for g, (factor, force) in zip(m._get_fsdp_state()._fsdp_param_groups, was):
                g.gradient_divide_factor, g.force_sum_reduction_for_comms = factor, force


@contextlib.contextmanager
def whole_root(model):
    """Generation calls the model's parts (embeddings, the vision tower's norms) outside its forward, where FSDP2
    would gather the root's own parameters: gather them for the duration. The blocks gather themselves."""
    if not is_fsdp(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        reshard(model)


def reshard(model) -> None:
    """Put every FSDP2 unit back on its shards. A unit set not to reshard after forward (transformers' plan does so
    for the last ones, which backward needs at once) keeps its whole parameters after a forward with no backward,
    such as generation; code that reads `named_parameters()` for shards must not find them whole."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_state_dict(model) -> dict[str, torch.Tensor] | None:
    """Every weight whole, on the CPU of the first process (None on the others). A collective: every process calls
    it. None for a model that is not sharded: its own state_dict is whole."""
    if not is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if dist.is_main() else None


@torch.no_grad()
def load_rows(model, read, names) -> None:
    """Fill the model's state_dict entries named in `names` from `read(name, rows)`: the tensor saved under `name`,
    or for a sharded one only the dim-0 rows `rows` (a slice), so that no process reads more than its shard."""
    for name, t in model.state_dict().items():
        if name not in names:
            continue
        if is_sharded(t):
            part = local(t)
            lo = offset(t) // max(t.numel() // max(t.shape[0], 1), 1)
            part.copy_(read(name, slice(lo, lo + part.shape[0])))
        else:
            t.copy_(read(name, None))


def gather_values(model, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """{name: values of the masked elements, in the mask's order} on the first process (None on the others): each
    rank sends the values inside its shard. A collective. None for a model that is not sharded (save_delta reads
    the values itself)."""
    if not is_fsdp(model):
        return None
    params = dict(model.named_parameters())
    mine = {}
    for n, idx in masks.items():
        p = params[n]
        idx = idx.to(torch.int64).cpu()
        lo, k = offset(p), local(p).numel()
        inside = (idx >= lo) & (idx < lo + k)
        mine[n] = (inside.nonzero().view(-1), local(p).detach().reshape(-1).cpu()[idx[inside] - lo])
    parts = [None] * dist.world() if dist.is_main() else None
    torch.distributed.gather_object(mine, parts, dst=0)
    if not dist.is_main():
        return None
    out = {}
    for n, idx in masks.items():
        vals = torch.empty(idx.numel(), dtype=params[n].dtype)
        for part in parts:
            where, v = part[n]
            vals[where] = v
        out[n] = vals
    return out
