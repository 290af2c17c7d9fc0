"""The methods of the continual loop, registered by name (`--method`). A method is one function

    fn(model, processor, task, cfg, masks=None) -> torch.optim.Optimizer

returning the optimizer over the weights it tunes for this task. cfg holds lr, seed, steps, batch_size, budget, tasks
(the whole sequence), index (this task's place in it), output (the run directory), main (whether this process writes
files) and resumed (the task is resumed midway: the weights, optimizer and RNG come back from the checkpoint, so the
method must not change the weights). Everything a method needs must follow from cfg and from the files it keeps under
`<output>/<method>/`, so that a resumed task rebuilds it exactly.

The optimizer may carry hooks the loop calls:
- `train_examples`: what the task trains on instead of its own examples (replay, multitask);
- `extra_loss(model, batch, out)`: a term added to the task loss (EWC, LwF, O-LoRA);
- `after_task(model)`: once the task's training ends, before the evaluation; it must not change the weights;
- `close()`: when the task's training ends (hooks to remove).

The function itself may carry
- `prepare(model)`: called once when the run starts, before the first evaluation and before a checkpoint is restored
  (adapters that change the model's structure: the checkpoints hold the adapted model);
- `finish(model)`: called when the run ends, before the final model is saved (merge adapters into the weights).

The sparse methods (piece-f, piece-s, trace, …) are registered by piece_mm/continual.py; the baselines live here, one
module each."""
from __future__ import annotations

from typing import Callable

METHODS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        METHODS[name] = fn
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


from piece_mm.methods import ewc, ln, lwf, migu, multitask, olora, replay, seqft, seqlora  # noqa: E402,F401  (register)
