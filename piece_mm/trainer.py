"""transformers.Trainer integration: PIECE in an existing Trainer script is score → select → sparse optimizer passed
through `optimizers=(opt, sched)`, plus this callback. See examples/trainer_piece.py."""
from __future__ import annotations

from transformers import TrainerCallback


class PieceCallback(TrainerCallback):
    """Clips by the norm of the sparse optimizer's own (selected) gradient before every optimizer step, and removes
    its gradient hooks when training ends.

    Trainer's `max_grad_norm` clips model.parameters(), whose dense gradients the sparse optimizer drops as soon as
    it has gathered them, so it has nothing to clip: set max_grad_norm=0 in TrainingArguments and give the value
    here.

    On FSDP2 shards (a model sharded by transformers as it loads, examples/trainer_piece.py) the norm is summed over
    every process's shard of the selected gradient, so all of them clip by the same factor."""

    def __init__(self, max_grad_norm: float = 1.0):
        self.max_grad_norm = max_grad_norm
        self.last_norm: float | None = None

    @staticmethod
    def _sparse(optimizer):
        inner = getattr(optimizer, "optimizer", optimizer)  # Trainer hands over accelerate's wrapper
        if not hasattr(inner, "compact_params"):
            raise TypeError("PieceCallback: the Trainer's optimizer is not pm.sparse_optimizer(...); pass it through "
                            "Trainer(optimizers=(opt, scheduler))")
        return inner

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.max_grad_norm and self.max_grad_norm > 0:
            self.last_norm = float(self._sparse(optimizer).clip_grad_norm_(self.max_grad_norm))

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self._sparse(optimizer).close()
