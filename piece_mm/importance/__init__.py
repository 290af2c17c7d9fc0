"""Importance scores, one function per estimator, registered by name.

An estimator is fn(model, batches, params: {name: Parameter}, **options) -> {name: float32 tensor shaped like the
param}. `estimate_importance` looks the name up, makes sure weights and train/eval mode come back untouched."""
from __future__ import annotations

from typing import Iterable

import torch

from piece_mm import shard
from piece_mm.importance import piece, trace  # noqa: F401  (they register their estimators)
from piece_mm.importance.registry import ESTIMATORS, register  # noqa: F401
from piece_mm.sparse import gather_paused


def estimate_importance(model, batches: Iterable[dict], method: str = "piece-f", names: list[str] | None = None,
                        **options) -> dict[str, torch.Tensor]:
    """{param name: float32 score tensor shaped like the param} for `names` (default: every parameter).

    `batches` is any iterable of dicts that model(**batch) accepts, with labels; each dict is one scoring batch, so
    the batch size of the scoring pass is the size of these dicts (1 = per-sample). With per_sample=True every sample
    of a dict counts as its own batch of 1, computed exactly in one batched pass (the fast way to score per-sample).
    Scoring runs in eval mode (no
    dropout, deterministic), with activation checkpointing where the model has it switched on; weights are never
    written and the mode and requires_grad flags are restored."""
    if method not in ESTIMATORS:
        raise KeyError(f"importance method {method!r}: unknown; known: {', '.join(sorted(ESTIMATORS))}")
    if shard.is_fsdp(model):
        shard.reshard(model)  # its parameters as shards, not left whole by an earlier forward
    all_params = dict(model.named_parameters())
    names = list(all_params) if names is None else list(names)
    missing = [n for n in names if n not in all_params]
    if missing:
        raise KeyError(f"estimate_importance: no parameter named {missing[0]!r}")
    params = {n: all_params[n] for n in names}
    was_training = model.training
    flags = {n: p.requires_grad for n, p in all_params.items()}
    grads = {n: p.grad for n, p in all_params.items()}
    try:
        for n, p in all_params.items():
            p.requires_grad_(n in params)  # only the scored weights hold a gradient
            p.grad = None
        model.eval()
        for m in model.modules():  # transformers checkpoints a layer only in training mode: the layer objects alone
            if getattr(m, "gradient_checkpointing", False) is True:  # (not their dropout) say so, scores stay exact
                m.training = True
        with gather_paused():  # a live sparse optimizer's hooks would take the dense gradients scoring reads
            scores = ESTIMATORS[method](model, batches, params, **options)
    finally:
        for n, p in all_params.items():
            p.requires_grad_(flags[n])
            p.grad = grads[n]
        model.train(was_training)
    return {n: scores[n].float() for n in names}
