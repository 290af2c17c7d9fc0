"""MIGU (Du et al., 2024): full fine-tuning in which each linear layer updates only the rows (output features) whose
output magnitude is among its top T on the current batch; the mask is recomputed every step.

The magnitude of output feature j is the mean of |y_j| over the batch's positions, L1-normalised over the layer's
features (which does not change the ranking). T (configs/methods/migu.yaml: 0.7) keeps the top 70 % of each layer's
features; I could not find the authors' value offline, and 0.7 is the default of a public reimplementation. Weights
that are not in a linear layer (norms, embeddings, the patch convolution) are fine-tuned as in SeqFT."""
from __future__ import annotations

import math

import torch

from piece_mm.methods import Setting, Tuning, register
from piece_mm.methods.seqft import adamw


def row_mask(out: torch.Tensor, top: float) -> torch.Tensor:
    """[out_features] bool: the features of `out` ([..., out_features]) with the top ceil(top · n) mean |y|."""
    mag = out.detach().abs().reshape(-1, out.shape[-1]).float().mean(0)
    mag = mag / mag.sum().clamp_min(1e-12)
    keep = torch.zeros_like(mag, dtype=torch.bool)
    keep[mag.topk(math.ceil(top * mag.numel())).indices] = True
    return keep


class MaskedRows:
    """Forward hooks that keep each trainable linear layer's row mask of the current batch, and gradient hooks that
    zero the other rows of its weight and bias gradients."""

    def __init__(self, model, top: float):
        self.masks: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and m.weight.requires_grad:
                self.handles.append(m.register_forward_hook(self._record(name, top)))
                self.handles.append(m.weight.register_hook(self._mask(name, weight=True)))
                if m.bias is not None and m.bias.requires_grad:
                    self.handles.append(m.bias.register_hook(self._mask(name, weight=False)))

    def _record(self, name, top):
        def hook(module, inputs, out):
            if module.training and torch.is_grad_enabled():
                self.masks[name] = row_mask(out, top)
        return hook

    def _mask(self, name, weight: bool):
        def hook(grad):
            keep = self.masks.get(name)
            if keep is None:
                return grad
            return grad * (keep[:, None] if weight else keep).to(grad.dtype)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()


@register("migu", settings={"top": Setting(float, 0.0, 1.0)})
def migu(model, processor, task, ctx, masks=None):
    """Full fine-tuning with MIGU's per-step row masks on every linear layer (AdamW, recreated per task)."""
    opt = adamw(model, ctx.lr)
    return Tuning(opt, close=MaskedRows(model, ctx.settings["top"]).close)
