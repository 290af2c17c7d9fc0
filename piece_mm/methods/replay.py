"""Replay: a share of every earlier task's training examples mixed into the current task's."""
from __future__ import annotations

import random

from piece_mm.methods import Tuning, register
from piece_mm.methods.seqft import adamw

FRACTION = 0.10  # of each earlier task's training examples


@register("replay")
def replay(model, processor, task, cfg, masks=None):
    """Full fine-tuning on the task's examples plus 10 % of each earlier task's (a seeded sample). It uses earlier
    tasks' data, so it is a reference, not a competitor."""
    rng = random.Random(cfg["seed"])
    extra = [ex for t in cfg["tasks"][:cfg["index"]] for ex in rng.sample(t.train, int(FRACTION * len(t.train)))]
    return Tuning(adamw(model, cfg["lr"]), train_examples=list(task.train) + extra)
