"""The methods of the continual loop, registered by name (`--method`), each behind one contract:

- `Method`: what the run asks of a method once: `for_task`, and optionally `prepare(model)` (called once when the
  run starts, before the first evaluation and before a checkpoint is restored: adapters that change the model's
  structure, so that the checkpoints hold the adapted model) and `finish(model)` (when the run ends, before the final
  model is saved: merge adapters into the weights). `sparse` methods choose masks, which a resumed task reads back;
  `sharded` ones also run on FSDP2 shards.
- `for_task(model, processor, task, cfg, masks=None) -> Tuning`: what the method trains for this task.
- `Tuning`: the optimizer over the weights it tunes, and what else the loop must do with it:
  - `masks`, `parts`: the chosen elements and the components they were chosen in (sparse methods; saved as masks
    and deltas);
  - `train_examples`: what the task trains on instead of its own examples (replay, multitask);
  - `extra_loss(model, batch, out)`: a term added to the task loss (EWC, LwF, O-LoRA);
  - `after_task(model)`: once the task's training ends, before the evaluation; it must not change the weights;
  - `close()`: when the task's training ends (hooks to remove).

cfg holds lr, seed, steps, batch_size, budget, tasks (the whole sequence), index (this task's place in it), output
(the run directory), main (whether this process writes files) and resumed (the task is resumed midway: the weights,
optimizer and RNG come back from the checkpoint, so the method must not change the weights). Everything a method
needs must follow from cfg and from the files it keeps under `<output>/<method>/`, so that a resumed task rebuilds
it exactly.

The sparse methods (piece-f, piece-s, trace, …) are in piece.py; the baselines beside them, one
module each. Their constants are at the top of each module."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Tuning:
    """What a method trains for one task (module docstring)."""
    optimizer: torch.optim.Optimizer
    masks: dict | None = None
    parts: dict | None = None
    train_examples: list | None = None
    extra_loss: Callable | None = None
    after_task: Callable | None = None
    close: Callable | None = None


@dataclass
class Method:
    """A method of the continual loop (module docstring)."""
    name: str
    for_task: Callable[..., Tuning]
    prepare: Callable | None = None
    finish: Callable | None = None
    sparse: bool = False
    sharded: bool = False


METHODS: dict[str, Method] = {}


def register(name: str, *, prepare: Callable | None = None, finish: Callable | None = None, sparse: bool = False,
             sharded: bool = False):
    """Decorator: `fn` is the method's for_task."""
    def deco(fn):
        METHODS[name] = Method(name, fn, prepare=prepare, finish=finish, sparse=sparse, sharded=sharded)
        return fn
    return deco


def state_file(cfg: dict, name: str, index: int):
    """`<output>/<name>/<task number>-<task name>.safetensors`: a method's saved state for task `index`."""
    return cfg["output"] / name / f"{index + 1}-{cfg['tasks'][index].name}.safetensors"


def save_tensors(tensors: dict, path) -> None:
    """Write a safetensors file atomically (a kill leaves the old file or the new one)."""
    import os

    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({n: t.detach().contiguous() for n, t in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def load_tensors(path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


from piece_mm.methods import ewc, ln, lwf, migu, multitask, olora, piece, replay, seqft, seqlora  # noqa: E402,F401,I001
