"""transformers.Trainer integration: PIECE in an existing Trainer script is score → select → sparse optimizer passed
through `optimizers=(opt, sched)`, plus this callback, which can also add the default method's regulariser
(pm.Distillation) to the model's loss. See examples/trainer_piece.py."""
from __future__ import annotations

from transformers import TrainerCallback

from piece_mm.batching import HELD, ROWS


class PieceCallback(TrainerCallback):
    """Clips by the norm of the sparse optimizer's own (selected) gradient before every optimizer step, removes its
    gradient hooks when training ends, and with `regulariser` (a prepared pm.Distillation) adds its term to the loss
    of every training forward.

    Trainer's `max_grad_norm` clips model.parameters(), whose dense gradients the sparse optimizer drops as soon as
    it has gathered them, so it has nothing to clip: set max_grad_norm=0 in TrainingArguments and give the value
    here.

    The regulariser needs to know which prepared rows each batch holds: build the batches with its collator
    (`data_collator=reg.collator(processor, held_per_step, rank=, world=)`, over the list given to prepare). Each part
    of the term is divided by its count of positions over every process, as the continual loop divides it; under
    gradient accumulation the step's micro-batches are taken as alike in size (the loop counts them exactly).

    On FSDP2 shards (a model sharded by transformers as it loads, examples/trainer_piece.py) the norm is summed over
    every process's shard of the selected gradient, so all of them clip by the same factor."""

    def __init__(self, max_grad_norm: float = 1.0, regulariser=None):
        self.max_grad_norm = max_grad_norm
        self.regulariser = regulariser
        self.last_norm: float | None = None
        self.last_term: float | None = None
        self._handles: list = []

    @staticmethod
    def _sparse(optimizer):
        inner = getattr(optimizer, "optimizer", optimizer)  # Trainer hands over accelerate's wrapper
        if not hasattr(inner, "compact_params"):
            raise TypeError("PieceCallback: the Trainer's optimizer is not pm.sparse_optimizer(...); pass it through "
                            "Trainer(optimizers=(opt, scheduler))")
        return inner

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.regulariser is None or model is None:
            return
        from piece_mm import dist
        reg, accumulation, seen = self.regulariser, max(1, args.gradient_accumulation_steps), {}
        across = getattr(args, "average_tokens_across_devices", False)

        def before(module, margs, mkwargs):  # the loop's own keys are not model inputs: keep them aside
            seen.clear()
            if ROWS in mkwargs:
                seen.update({k: mkwargs[k] for k in ("input_ids", "attention_mask", "labels", ROWS, HELD)
                             if k in mkwargs})
                mkwargs = {k: v for k, v in mkwargs.items() if k not in (ROWS, HELD)}
            return margs, mkwargs

        def after(module, margs, mkwargs, out):
            if not (module.training and seen and getattr(out, "loss", None) is not None):
                return out
            # each part's sum over the step's count of its positions, as the continual loop divides it: the count
            # over every process, times the micro-batches of the step (taken as alike); then undo what Trainer does
            # to a loss (with num_items_in_batch it leaves micro-batches undivided and, averaging tokens across
            # devices, multiplies by the process count; the gradients are averaged over the processes)
            counts = reg.counts(seen).to(out.loss.device).float()
            dist.sum_([counts])
            term = (reg(module, seen, out) / (counts * accumulation).clamp_min(1.0)).sum()
            items = mkwargs.get("num_items_in_batch") is not None
            if dist.world() > 1 and not (items and across):
                term = term * dist.world()
            if not items:
                term = term * accumulation
            self.last_term = float(term.detach())
            out.loss = out.loss + term
            return out
        self._handles = [model.register_forward_pre_hook(before, with_kwargs=True),
                         model.register_forward_hook(after, with_kwargs=True)]

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.max_grad_norm and self.max_grad_norm > 0:
            self.last_norm = float(self._sparse(optimizer).clip_grad_norm_(self.max_grad_norm))

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        for h in self._handles:
            h.remove()
        self._handles = []
        if optimizer is not None:
            self._sparse(optimizer).close()
