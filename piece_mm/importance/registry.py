"""The estimators of importance, registered by name: fn(model, batches, params: {name: Parameter}, **options) ->
{name: float32 tensor shaped like the param}. piece.py and trace.py register theirs here."""
from __future__ import annotations

from typing import Callable

ESTIMATORS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        ESTIMATORS[name] = fn
        return fn
    return deco
