"""The methods of the continual loop, registered by name (`--method`), each behind one contract:

- `Method`: what the run asks of a method once: `for_task`, and optionally `prepare(model, settings)` (called once
  when the run starts, before the first evaluation and before a checkpoint is restored: adapters that change the
  model's structure, so that the checkpoints hold the adapted model), `finish(model, settings)` (when the run ends,
  before the final model is saved: merge adapters into the weights) and `metrics(ctx)` (entries it adds to
  metrics.json: TRACE's sketch cosines). What kind of method it is is said here once, for the loop, the CLI and
  the plan alike:
  - `kind`: "sparse" (chooses masks, which a resumed task reads back; the sparse optimizer), "dense" (whole
    weights, AdamW on fp32 masters) or "lora" (a PEFT adapter);
  - `sharded`: it also runs on FSDP2 shards;
  - `regulariser`: the term it adds to the loss, if any: "distill" (the budget's cached distillation,
    regularise.Distillation), "teacher" (LwF: a copy of the model), "ewc" (Fisher and anchor), "olora";
  - `settings`: the fields of its configs/methods YAML.
- `for_task(model, processor, task, ctx: TaskContext, masks=None) -> Tuning`: what the method trains for this task.
- `Tuning`: the optimizer over the weights it tunes, and what else the loop must do with it:
  - `masks`, `parts`: the chosen elements and the components they were chosen in (sparse methods; saved as masks
    and deltas);
  - `train_examples`: what the task trains on instead of its own examples (replay, multitask);
  - `regulariser`: a term added to the task loss (regularise.Regulariser: each part a sum and a count, which the
    loop normalises over the whole step);
  - `held_examples`, `held_per_step`: examples that join each step's batch, that many of them, as rows the task
    loss does not learn and the regulariser holds (batch["held"] marks their answer positions: the budget's held
    prompts, methods/held.py);
  - `after_task(model)`: once the task's training ends, before the evaluation; it must not change the weights;
  - `close()`: when the task's training ends (hooks to remove).

`TaskContext` is all a method is told about the task's run (frozen). Everything a method needs must follow from it
and from the files it keeps under `<output>/<method>/`, so that a resumed task rebuilds it exactly: `resumed` says
the task is resumed midway (the weights, optimizer and RNG come back from the checkpoint, so the method must not
change the weights).

A method's constants (EWC's λ, LoRA's rank, …) live in configs/methods/<name>.yaml: `register(..., settings=)` says
which fields the file must hold and of what kind, `load_settings` reads and checks them, and the loop hands them to
the method as ctx.settings (and to prepare/finish as their second argument). `--method-config FILE` replaces the
shipped file for a run.

The sparse methods (piece-f, piece-s, trace, …) are in piece.py (their settings are the budget YAML's); the baselines
beside them, one module each."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


@dataclass(frozen=True)
class TaskContext:
    """What a method is told about one task of the run (module docstring). `tasks` is the whole sequence and `index`
    this task's place in it; `output` the run directory; `budget` the sparse methods' budget dict; `settings` the
    method's constants; `main` whether this process writes files; `generate(model, processor, examples,
    max_new_tokens)` greedy replies as evaluation makes them."""
    tasks: list
    output: Path
    index: int = 0
    lr: float = 1e-4
    seed: int = 0
    steps: int = 1
    batch_size: int = 16
    budget: dict | None = None
    settings: dict = field(default_factory=dict)
    main: bool = True
    resumed: bool = False
    log: Callable | None = None
    gradient_checkpointing: bool = False
    generate: Callable | None = None

    @property
    def task(self):
        return self.tasks[self.index]


@dataclass
class Tuning:
    """What a method trains for one task (module docstring)."""
    optimizer: torch.optim.Optimizer
    masks: dict | None = None
    parts: dict | None = None
    train_examples: list | None = None
    regulariser: Callable | None = None
    held_examples: list | None = None
    held_per_step: int = 0
    after_task: Callable | None = None
    close: Callable | None = None


@dataclass
class Method:
    """A method of the continual loop (module docstring)."""
    name: str
    for_task: Callable[..., Tuning]
    prepare: Callable | None = None
    finish: Callable | None = None
    kind: str = "dense"  # "sparse", "dense" or "lora"
    sharded: bool = False
    regulariser: str | None = None  # "distill", "teacher", "ewc", "olora" or None
    settings: dict = field(default_factory=dict)  # {field: Setting} that configs/methods/<name>.yaml must hold
    metrics: Callable | None = None  # metrics(ctx) -> {key: value} the method adds to metrics.json at the end

    @property
    def sparse(self) -> bool:
        return self.kind == "sparse"


@dataclass(frozen=True)
class Setting:
    """One field of a method's YAML: its kind (int or float) and its range, lo <= value (<= hi)."""
    kind: type
    lo: float
    hi: float | None = None

    def check(self, value) -> bool:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            self.kind is float or isinstance(value, int))
        return ok and value >= self.lo and (self.hi is None or value <= self.hi)

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        return f"{what} >= {self.lo:g}" + (f" and <= {self.hi:g}" if self.hi is not None else "")


METHODS: dict[str, Method] = {}


KINDS = ("sparse", "dense", "lora")


def register(name: str, *, kind: str = "dense", prepare: Callable | None = None, finish: Callable | None = None,
             sharded: bool = False, regulariser: str | None = None, settings: dict | None = None,
             metrics: Callable | None = None):
    """Decorator: `fn` is the method's for_task."""
    assert kind in KINDS, kind

    def deco(fn):
        METHODS[name] = Method(name, fn, prepare=prepare, finish=finish, kind=kind, sharded=sharded,
                               regulariser=regulariser, settings=settings or {}, metrics=metrics)
        return fn
    return deco


def of_kind(kind: str) -> tuple[str, ...]:
    """The registered methods of one kind, in registration order."""
    return tuple(n for n, m in METHODS.items() if m.kind == kind)


def settings_file(name: str) -> Path:
    from piece_mm.configs import DIR
    return DIR / "methods" / f"{name}.yaml"


def load_settings(name: str, path=None) -> dict:
    """The constants of method `name`: configs/methods/<name>.yaml, or the YAML at `path` (--method-config), with
    every field the method declares, of the declared kind and range. A method without constants has no file and gets
    {} (a --method-config for it is refused)."""
    import yaml

    from piece_mm.errors import InputError
    spec = METHODS[name].settings
    if path is None:
        path = settings_file(name)
        if not spec:
            return {}
    elif not spec:
        raise InputError(f"--method-config {str(path)!r}: method {name!r} has no settings (its numbers are the "
                         "budget's, or the flags')")
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: method settings file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of {name}'s settings ({', '.join(spec)}), got {data!r:.60}")
    for key in data:
        if key not in spec:
            raise InputError(f"{path}: unknown field {key!r} for method {name}; known: {', '.join(spec)}")
    for key, setting in spec.items():
        if key not in data:
            raise InputError(f"{path}: required field {key!r} is missing")
        if not setting.check(data[key]):
            raise InputError(f"{path}: field {key!r} is {data[key]!r}; expected {setting.describe()}")
    return {k: setting.kind(data[k]) for k, setting in spec.items()}


def state_file(ctx: TaskContext, name: str, index: int):
    """`<output>/<name>/<task number>-<task name>.safetensors`: a method's saved state for task `index`."""
    return Path(ctx.output) / name / f"{index + 1}-{ctx.tasks[index].name}.safetensors"


def save_tensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically (a kill leaves the old file or the new one)."""
    import os

    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({n: t.detach().contiguous() for n, t in tensors.items()}, str(tmp), metadata)
    os.replace(tmp, path)


def load_tensors(path, device=None) -> dict:
    """A method's saved state (state_file), on `device` (default: the CPU; a method that computes with it beside the
    weights loads it onto theirs); a file missing or damaged is one line that names it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from piece_mm.errors import InputError
    try:
        return load_file(str(path), device=str(device) if device is not None else "cpu")
    except (OSError, SafetensorError) as e:
        raise InputError(f"{path}: a method's saved state cannot be read ({str(e).splitlines()[0]})") from None


from piece_mm.methods import ewc, ln, lwf, migu, multitask, olora, piece, replay, seqft, seqlora  # noqa: E402,F401,I001
