"""SeqFT: full fine-tuning, one task after another."""
from __future__ import annotations

import torch

from piece_mm.methods import Tuning, register


@register("seqft")
def seqft(model, processor, task, cfg, masks=None):
    """Full fine-tuning, AdamW recreated for each task."""
    return Tuning(adamw(model, cfg["lr"]))


def adamw(model, lr: float) -> torch.optim.AdamW:
    """AdamW over every weight that requires a gradient, no weight decay."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
