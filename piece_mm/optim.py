"""Dense optimizers that keep fp32 master weights, for every method that tunes whole bf16 / fp16 weights (SeqFT,
LwF, EWC, replay, multitask, MIGU, LN, the LoRA family, TRACE's probe).

On a GPU the weights are bf16. An Adam update at lr 1e-5 is about 1e-5 per element, far below half of bf16's spacing
at a typical weight (2^-8 of its size: ~4e-5 at 0.02), so plain AdamW on bf16 weights rounds almost every update away
and the baseline barely trains. `MasterWeights` runs the inner optimizer on fp32 copies of the low-precision
parameters: their gradients are converted to fp32 at each step, the update is made on the copy, and the weight gets
the copy rounded to its dtype. fp32 / fp64 parameters are stepped in place, as plain AdamW would.

The sparse methods do the same for their chosen elements (sparse.py keeps compact fp32 masters); this is its dense
counterpart. Memory per tuned low-precision element: the 4-byte master and Adam's two fp32 moments (12 bytes), plus a
transient fp32 gradient during the step (piece_mm.plan counts them)."""
from __future__ import annotations

import torch

LOW = (torch.bfloat16, torch.float16)


class MasterWeights(torch.optim.Optimizer):
    """`optimizer_cls(params, **kwargs)`, run on fp32 masters of the low-precision params (module docstring).

    The model's parameters keep their `.grad` (so clipping and summing over processes work on them as usual);
    `grad_params()` names them. `param_groups` and `state` are the inner optimizer's (LR schedulers see its lr);
    `state_dict` also holds the masters, which the rounded weights cannot give back, so a resumed run continues from
    the same ones."""

    def __init__(self, params, optimizer_cls=torch.optim.AdamW, **kwargs):
        self.params = [p for p in params]
        self._pairs = []  # (param, master); master is param itself for fp32 / fp64
        for p in self.params:
            if p.dtype in LOW:
                m = p.detach().to(torch.float32).clone().requires_grad_(True)
            else:
                m = p
            self._pairs.append((p, m))
        self.inner = optimizer_cls([m for _, m in self._pairs], **kwargs)
        super().__init__([m for _, m in self._pairs], self.inner.defaults)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def grad_params(self) -> list:
        """The parameters whose `.grad` this optimizer follows (the model's own)."""
        return self.params

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p, m in self._pairs:
            if m is not p:
                m.grad = None if p.grad is None else p.grad.to(torch.float32)
        self.inner.step()
        for p, m in self._pairs:
            if m is not p:
                m.grad = None  # the fp32 copy of the gradient lives only during the step
                p.copy_(m)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, m in self._pairs:
            if set_to_none:
                p.grad = None
                m.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self):
        return save_state(self.inner, [m for p, m in self._pairs if m is not p])

    def load_state_dict(self, state_dict) -> None:
        masters = load_state(self, state_dict)
        if masters is not None:
            with torch.no_grad():
                for (p, m), saved in zip([pm for pm in self._pairs if pm[1] is not pm[0]], masters):
                    m.copy_(saved.to(m.device))
                    p.copy_(m)

    def master_bytes(self) -> int:
        """Bytes of the fp32 masters (0 when every parameter is fp32)."""
        return sum(m.numel() * m.element_size() for p, m in self._pairs if m is not p)


def save_state(inner: torch.optim.Optimizer, masters: list) -> dict:
    """An optimizer over fp32 masters, as a state dict: the inner optimizer's state and, when there are any, the
    masters themselves, which the rounded weights alone cannot give back (so a resumed bf16 run continues from the
    same ones). Shared by MasterWeights and sparse.SparseOptimizer."""
    sd = inner.state_dict()
    if masters:
        sd["masters"] = [m.detach().clone() for m in masters]
    return sd


def load_state(opt, state_dict: dict) -> list | None:
    """`save_state`'s dict back into `opt.inner`, whose groups and state `opt` shares again; returns the saved
    masters (None when there were none), for `opt` to put back where it keeps them."""
    state_dict = dict(state_dict)
    masters = state_dict.pop("masters", None)
    opt.inner.load_state_dict(state_dict)
    opt.param_groups = opt.inner.param_groups
    opt.state = opt.inner.state
    return masters


def adamw(params, lr: float, **kwargs) -> torch.optim.Optimizer:
    """AdamW (no weight decay unless given) over `params`: with fp32 masters when any of them is bf16 / fp16, plain
    AdamW otherwise."""
    params = list(params)
    kwargs.setdefault("weight_decay", 0.0)
    if any(p.dtype in LOW for p in params):
        return MasterWeights(params, torch.optim.AdamW, lr=lr, **kwargs)
    return torch.optim.AdamW(params, lr=lr, **kwargs)
