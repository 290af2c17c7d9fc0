"""Replay: a share of every earlier task's training examples mixed into the current task's."""
from __future__ import annotations

import random

from piece_mm.methods import Setting, Tuning, register
from piece_mm.methods.seqft import adamw


@register("replay", settings={"fraction": Setting(float, 0.0, 1.0)})
def replay(model, processor, task, ctx, masks=None):
    """Full fine-tuning on the task's examples plus a share (configs/methods/replay.yaml: 10 %) of each earlier
    task's (a seeded sample). It uses earlier tasks' data, so it is a reference, not a competitor."""
    rng = random.Random(ctx.seed)
    share = ctx.settings["fraction"]
    extra = [ex for t in ctx.tasks[:ctx.index] for ex in rng.sample(t.train, int(share * len(t.train)))]
    return Tuning(adamw(model, ctx.lr), train_examples=list(task.train) + extra)
