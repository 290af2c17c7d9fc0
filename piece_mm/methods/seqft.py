"""SeqFT: full fine-tuning, one task after another."""
from __future__ import annotations

import torch

from piece_mm.methods import Tuning, register


@register("seqft")
def seqft(model, processor, task, ctx, masks=None):
    """Full fine-tuning, AdamW recreated for each task."""
    return Tuning(adamw(model, ctx.lr))


def adamw(model, lr: float) -> torch.optim.Optimizer:
    """AdamW over every weight that requires a gradient, no weight decay; bf16 / fp16 weights get fp32 masters
    (piece_mm/optim.py), so that updates below their resolution are not lost."""
    from piece_mm import optim
    return optim.adamw([p for p in model.parameters() if p.requires_grad], lr)
