"""`RunConfig`: everything one run of the continual loop is given (the flags of `python -m piece_mm.train`, typed),
checked where it is made. The CLI builds it from its flags; experiments (compare, sweep) build it directly and hand
it to `piece_mm.train.execute`. What it names (the sequence YAML, the budget YAML, the method's settings YAML) is
read and checked when the run resolves it, each file with its own fields (tasks.sequence, `pm.Budget`,
methods.load_settings)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from piece_mm.errors import InputError


@dataclass
class RunConfig:
    model: str = "llava"  # an alias, a local checkpoint dir, or a cached HF id
    method: str = "piece-f"
    budget: str | None = None  # budget YAML, or a name in configs/budgets (sparse methods); None: the sequence's
    # train.budget, else "default"
    tasks: str = "world"  # sequence YAML, or a name in configs/sequences
    output: Path | None = None  # default: runs/<model>-<method>-<time>
    seed: int = 0
    device: str = "auto"
    dtype: str | None = None  # auto, float32, bfloat16, float16; None: bfloat16 on CUDA, float32 elsewhere
    data_root: str | None = None  # what a `paths: data-root` sequence's paths are relative to; None: the env's
    steps: int | None = None  # default: from epochs, else the budget's (sparse methods), else the sequence's
    epochs: float | None = None  # passes over each task's examples (steps derived); default: the sequence's
    lr: float | None = None  # default: the budget's (sparse methods), else the sequence's train.lr
    batch_size: int | None = None  # default: the sequence's train.batch_size
    grad_accum: int = 1
    max_length: int | None = None
    gradient_checkpointing: bool = False
    max_steps: int | None = None
    eval_limit: int | None = None
    eval_general: str = "every"  # the general set after every task, or only after the "last" (what retention reads)
    trust_remote_code: bool = False
    resume: bool = False
    clip_model: str | None = None
    clip_weights: str | None = None
    corenlp: str | None = None
    caption_prompt: str | None = None
    caption_max_new_tokens: int | None = None
    answer_max_new_tokens: int | None = None
    allow_unknown_tokens: bool = False
    retention_threshold: float = 0.90
    checkpoint_every: int = 50
    method_config: str | None = None  # a YAML replacing configs/methods/<method>.yaml
    exclude: str | None = None  # dense / LoRA methods: regexes (comma-separated) of weights left frozen, or "budget"

    def __post_init__(self):
        from piece_mm.methods import METHODS
        if self.output is not None:
            self.output = Path(self.output)
        if self.method not in METHODS:
            raise InputError(f"--method {self.method!r}: unknown; known: {', '.join(sorted(METHODS))}")
        for name in ("steps", "batch_size", "max_steps", "eval_limit", "grad_accum", "max_length",
                     "caption_max_new_tokens", "answer_max_new_tokens"):
            _positive(name, getattr(self, name), int)
        _positive("lr", self.lr, float)
        _positive("epochs", self.epochs, float)
        _positive("retention_threshold", self.retention_threshold, float)
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise InputError(f"--checkpoint-every: {self.checkpoint_every!r}; expected 0 or a positive int")
        if self.eval_general not in ("every", "last"):
            raise InputError(f"--eval-general {self.eval_general!r}: expected every or last")
        if self.dtype not in (None, "auto", "float32", "bfloat16", "float16"):
            raise InputError(f"--dtype {self.dtype!r}: expected auto, float32, bfloat16 or float16")

    @classmethod
    def from_flags(cls, flags) -> RunConfig:
        """From parsed flags (an argparse Namespace or a dict): the fields of the class, the rest ignored."""
        values = flags if isinstance(flags, dict) else vars(flags)
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    def flags(self) -> dict:
        """The fields as JSON holds them (run_args.json)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def _positive(name: str, value, kind) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or value <= 0:
        raise InputError(f"--{name.replace('_', '-')}: {value!r}; expected a positive {kind.__name__}")
