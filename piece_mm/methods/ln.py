"""LayerNorm tuning: only the normalisation layers are trained."""
from __future__ import annotations

from piece_mm import optim
from piece_mm.methods import Tuning, register


def norm_params(model) -> list[str]:
    """Names of the normalisation layers' parameters (LayerNorm, RMSNorm and the transformers variants)."""
    return [f"{m_name}.{p_name}" if m_name else p_name
            for m_name, m in model.named_modules() if type(m).__name__.endswith(("LayerNorm", "RMSNorm"))
            for p_name, _ in m.named_parameters(recurse=False)]


@register("ln")
def ln(model, processor, task, ctx, masks=None):
    """Only the normalisation layers are trained (AdamW, recreated per task); every other weight is frozen."""
    norms = set(norm_params(model))
    for n, p in model.named_parameters():
        p.requires_grad_(n in norms)
    return Tuning(optim.adamw([p for n, p in model.named_parameters() if n in norms], ctx.lr))
