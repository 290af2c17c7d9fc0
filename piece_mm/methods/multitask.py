"""Multitask: joint training on every task so far, the upper bound."""
from __future__ import annotations

from piece_mm.methods import Tuning, register
from piece_mm.methods.seqft import adamw


@register("multitask")
def multitask(model, processor, task, ctx, masks=None):
    """Full fine-tuning on the union of the examples of every task so far: after the last task, the multitask
    upper bound."""
    return Tuning(adamw(model, ctx.lr), train_examples=[ex for t in ctx.tasks[:ctx.index + 1]
                                                           for ex in t.train])
