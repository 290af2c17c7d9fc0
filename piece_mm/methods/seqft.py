"""SeqFT: full fine-tuning, one task after another."""
from __future__ import annotations

import torch

from piece_mm.methods import register


@register("seqft")
def seqft(model, processor, task, cfg, masks=None):
    """Full fine-tuning, AdamW recreated for each task."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"], weight_decay=0.0)
