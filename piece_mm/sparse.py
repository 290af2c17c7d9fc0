"""An optimizer that changes only the selected elements of each parameter.

The inner optimizer (any torch.optim class) runs on compact leaf tensors that hold just the selected elements, so
its state (Adam moments, ...) exists only for them, weight decay touches only them, and the result is by
construction the inner optimizer run on the compact vector. After each step the compact values are scattered back;
nothing else in the parameter is ever written, so unselected elements stay bit-identical.

Precision: the compact copies are float32 whatever the parameter's dtype (fp32 master copies), so the inner
optimizer's state is float32 too, and a bf16 / fp16 parameter receives the master value rounded to its dtype after
each step. At lr 1e-5 most Adam updates are below bf16's resolution; they add up in the master copy instead of
being lost.

Memory: a hook that runs right after autograd accumulates a parameter's gradient gathers the selected elements into
the compact gradient (adding to it, so micro-batch accumulation works) and drops the dense gradient at once. During
backward at most the dense gradient being gathered is alive, not one per parameter. A consequence: dense `.grad` of
masked parameters stays None, so clip through `clip_grad_norm_` here, not over model.parameters().

FSDP2 shards (piece_mm/shard.py): the masks stay whole-parameter flat indices, and each rank keeps masters and state
only for the chosen elements inside its own shard, gathers them from its shard of the (reduce-scattered) gradient
and writes them back into its shard. A parameter with chosen elements on any rank keeps requires_grad on every rank
(FSDP2's collectives need the same parameters everywhere), with an empty compact tensor where its shard has none.
The gradient norm for clipping is summed over the ranks."""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch

from piece_mm import dist, shard
from piece_mm.optim import load_state, save_state

_paused = 0  # > 0 while importance scoring needs the dense gradients that the gather hooks would take away


@contextmanager
def gather_paused():
    """Dense gradients stay where autograd puts them, even on parameters of a live sparse optimizer."""
    global _paused
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1


class SparseOptimizer(torch.optim.Optimizer):
    def __init__(self, model, masks: dict[str, torch.Tensor], optimizer_cls=torch.optim.AdamW, **kwargs):
        if shard.is_fsdp(model):
            shard.reshard(model)  # its parameters as shards, not left whole by an earlier forward
        named = dict(model.named_parameters())
        unknown = [n for n in masks if n not in named]
        if unknown:
            raise KeyError(f"sparse_optimizer: mask for {unknown[0]!r}, which the model does not have")
        self.masks = {n: idx for n, idx in masks.items() if idx.numel()}
        self._targets: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []  # (param, idx, compact)
        self._names: list[str] = []  # the parameter of each target
        self.sharded = any(shard.is_sharded(p) for p in named.values())
        for n, p in named.items():
            idx = self.masks.get(n)
            if idx is None:
                p.requires_grad_(False)  # no selected element: no dense gradient is ever kept for it
                p.grad = None
                continue
            _require_whole(n, p)
            idx = idx.to(dtype=torch.int64)  # flat indices, sorted
            if idx.min() < 0 or idx.max() >= p.numel():
                raise IndexError(f"sparse_optimizer: mask for {n!r} indexes outside its {p.numel()} elements")
            part = shard.local(p)
            idx = shard.local_part(idx, p).to(part.device)  # into this rank's shard (all of it when unsharded)
            p.requires_grad_(True)
            master = torch.float64 if p.dtype == torch.float64 else torch.float32  # fp32 master for bf16 / fp16
            compact = part.detach().reshape(-1)[idx].to(master).clone().requires_grad_(True)  # [k]
            self._targets.append((p, idx, compact))
            self._names.append(n)
        if not self._targets:
            raise ValueError("sparse_optimizer: the masks select no element")
        me = weakref.ref(self)  # the hooks must not keep a discarded optimizer (and its state) alive
        self._hooks = [p.register_post_accumulate_grad_hook(_gather_hook(me, i)) for i, (p, _, _) in
                       enumerate(self._targets)]
        self.inner = optimizer_cls([c for _, _, c in self._targets], **kwargs)
        super().__init__([c for _, _, c in self._targets], self.inner.defaults)
        # One set of groups and state, shared with the inner optimizer: LR schedulers, state_dict / load_state_dict
        # and Trainer see exactly what the inner optimizer uses.
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def state_dict(self):
        """The inner optimizer's state; with low-precision parameters also the fp32 master copies, which the
        rounded weights alone cannot give back (so a resumed bf16 run continues from the same masters)."""
        low = any(p.dtype != c.dtype for p, _, c in self._targets)
        return save_state(self.inner, [c for _, _, c in self._targets] if low else [])

    def load_state_dict(self, state_dict) -> None:
        masters = load_state(self, state_dict)
        if masters is not None:
            with torch.no_grad():
                for (_, _, c), m in zip(self._targets, masters):
                    c.copy_(m)

    def chosen_values(self) -> list[torch.Tensor]:
        """The chosen elements' values as the weights hold them now (this process's part, the weights' dtype), one
        tensor per parameter: what `holding` takes (benchmarks/run.py's reference teacher uses both)."""
        return [shard.local(p).detach().reshape(-1)[idx].clone() for p, idx, _ in self._targets]

    @contextmanager
    def holding(self, values: list[torch.Tensor]):
        """Inside the block the chosen elements hold `values` (as `chosen_values` gives them), and after it their
        own again, bit for bit; nothing the optimizer keeps changes. A teacher's forward in the middle of a step:
        the writes go through `.data`, outside autograd's version counters, so the student's forward that ran
        before the block keeps a valid backward, which reads the weights only after they are back."""
        own = self.chosen_values()
        try:
            self._write(values)
            yield
        finally:
            self._write(own)

    @torch.no_grad()
    def _write(self, values: list[torch.Tensor]) -> None:
        for (p, idx, _), v in zip(self._targets, values):
            part = shard.local(p).data
            if part.is_contiguous():
                part.view(-1).index_copy_(0, idx, v)
            else:
                part.copy_(part.reshape(-1).index_copy(0, idx, v).view_as(part))

    def compact_params(self) -> list[torch.Tensor]:
        return [c for _, _, c in self._targets]

    def grad_params(self) -> list[torch.Tensor]:
        """What holds the gradients this optimizer follows, for summing them over data-parallel processes: the
        compact ones; none on FSDP2 shards, whose reduce-scatter summed them in backward."""
        return [] if self.sharded else self.compact_params()

    def state_bytes(self) -> int:
        """Bytes this process holds for the chosen elements: fp32 masters, the inner optimizer's state tensors and
        the indices."""
        n = sum(c.numel() * c.element_size() + idx.numel() * idx.element_size() for _, idx, c in self._targets)
        return n + sum(v.numel() * v.element_size() for st in self.inner.state.values() for v in st.values()
                       if torch.is_tensor(v) and v.dim() > 0)

    @torch.no_grad()
    def _gather(self, i: int) -> None:
        p, idx, c = self._targets[i]
        g = shard.local(p.grad).reshape(-1)[idx].to(c.dtype)  # [k]
        c.grad = g if c.grad is None else c.grad.add_(g)
        p.grad = None

    def close(self) -> None:
        """Remove the gradient hooks from the model's parameters (the next task's optimizer brings its own)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm of the selected elements' gradient, the gradient this optimizer actually follows
        (clip_grad_norm_ over the model's dense gradients would count elements that never move). The norm is taken
        over the concatenated compact gradient, so clipping matches clipping that one vector exactly."""
        grads = [c.grad for c in self.compact_params() if c.grad is not None]
        if not grads and not self.sharded:
            return torch.tensor(0.0)
        flat = torch.cat([g.reshape(-1) for g in grads]) if grads else torch.zeros(0)
        if self.sharded:  # each rank holds its shard's part of the vector: the squares are summed over the ranks
            sq = flat.double().square().sum().reshape(1).cpu()
            dist.sum_exact(sq)
            norm = sq.sqrt().to(flat.dtype).squeeze(0).to(flat.device)
        else:
            norm = torch.linalg.vector_norm(flat)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for g in grads:
            g.mul_(coef)
        return norm

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for i, (p, idx, c) in enumerate(self._targets):
                if p.grad is not None:  # a gradient written by hand, not by backward: gather it as backward would
                    self._gather(i)
                _sync_master(p, idx, c)  # picks up any outside change to the weights (e.g. a loaded checkpoint)
        self.inner.step()
        with torch.no_grad():
            for p, idx, c in self._targets:
                part = shard.local(p)  # the whole parameter, or this rank's shard of it
                if part.is_contiguous():
                    part.view(-1).index_copy_(0, idx, c.to(p.dtype))
                else:
                    part.copy_(part.reshape(-1).index_copy(0, idx, c.to(p.dtype)).view_as(part))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, _, c in self._targets:
            for t in (p, c):
                if t.grad is not None:
                    if set_to_none:
                        t.grad = None
                    else:
                        t.grad.zero_()


def _sync_master(p, idx, c) -> None:
    """Take into the master copy the selected weights that someone else changed (a loaded checkpoint, a user's own
    write): those that no longer equal the master rounded to the parameter's dtype. The others keep the master's
    extra precision."""
    cur = shard.local(p).reshape(-1)[idx]
    if c.dtype == cur.dtype:
        c.copy_(cur)
        return
    changed = cur != c.to(cur.dtype)
    if changed.any():
        c[changed] = cur[changed].to(c.dtype)


def _require_whole(name: str, p) -> None:
    """Flat indices address a whole parameter, or (FSDP2) a DTensor sharded on dim 0, whose shard is one run of
    them. Other shards (FSDP1's FlatParameter, DeepSpeed ZeRO-3's partitioned parameter, other DTensor placements)
    are refused rather than indexed wrongly."""
    if shard.is_sharded(p):
        from torch.distributed.tensor import Shard
        if len(p.placements) == 1 and isinstance(p.placements[0], Shard) and p.placements[0].dim == 0:
            return
    elif type(p).__name__ != "FlatParameter" and not hasattr(p, "ds_id"):
        return
    raise TypeError(f"sparse_optimizer: parameter {name!r} is sharded in a way sparse tuning cannot index "
                    f"({type(p).__name__}); use FSDP2 (configs/accelerate/fsdp2.yaml) or data parallelism "
                    "(configs/accelerate/ddp.yaml)")


def _gather_hook(ref, i: int):
    def hook(p):
        opt = ref()
        # `is p`: a deep copy of the model carries this hook over to parameters the optimizer does not own
        if not _paused and opt is not None and p.grad is not None and opt._targets[i][0] is p:
            opt._gather(i)
    return hook


def sparse_optimizer(model, masks: dict[str, torch.Tensor], optimizer_cls=torch.optim.AdamW, **kwargs):
    """A torch.optim.Optimizer that runs optimizer_cls(**kwargs) on the masked elements only (see SparseOptimizer)."""
    return SparseOptimizer(model, masks, optimizer_cls, **kwargs)
